//! Issue 16: where a training step and a sampling step spend their time on the 32x32
//! CIFAR-like config (channels 32 and 64, 2 res blocks, attention at 16x16, batch 16), with the
//! per-tensor AdamW/EMA loops (before) and the flat buffers (after), and the noise of a sampling
//! step made as before (one float64 tensor per image, then concatenated) and now (straight
//! into one float32 buffer). `cargo bench -p progdiff-stages --bench hotloop`; on a GPU machine
//! it runs on `cuda:0` (`HOTLOOP_DEVICE=cpu` to force the CPU), `HOTLOOP_BATCH`,
//! `HOTLOOP_CHANNELS`, `HOTLOOP_STEPS` to change the config (e.g. the paper's CIFAR-10 config:
//! batch 128, channels 128, `HOTLOOP_MULT=1,2,2,2`, `HOTLOOP_RES_BLOCKS=3`).

use std::time::Instant;

use progdiff_stages::checkpoint::Checkpoint;
use progdiff_stages::config::ModelConfig;
use progdiff_stages::diffusion::{GaussianDiffusion, NoiseSource, SeededNoise};
use progdiff_stages::optim::{Trainer, Update};
use progdiff_stages::sample::ImageNoise;
use progdiff_stages::train::TrainParams;
use progdiff_stages::unet::{UNet, UNetArch};
use tch::{Device, Kind, Tensor};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn main() -> anyhow::Result<()> {
    let device = match std::env::var("HOTLOOP_DEVICE").as_deref() {
        Ok("cpu") => Device::Cpu,
        _ if tch::Cuda::is_available() => Device::Cuda(0),
        _ => Device::Cpu,
    };
    let batch: i64 = env("HOTLOOP_BATCH", 16);
    let steps: usize = env("HOTLOOP_STEPS", 20);
    let mult: Vec<usize> = std::env::var("HOTLOOP_MULT")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .map(|m| m.trim().parse().expect("HOTLOOP_MULT: comma-separated integers"))
        .collect();
    let cfg = ModelConfig {
        image_size: 32,
        in_channels: 3,
        channels: env("HOTLOOP_CHANNELS", 32),
        channel_mult: mult,
        res_blocks: env("HOTLOOP_RES_BLOCKS", 2),
        attention_resolutions: vec![16],
        heads: 4,
        dropout: 0.1,
        learn_sigma: true,
        use_scale_shift_norm: true,
    };
    let arch = UNetArch::from_config(&cfg)?;
    let vs = tch::nn::VarStore::new(Device::Cpu);
    tch::manual_seed(0);
    let _net = UNet::new(&vs.root(), &arch)?;
    let init = Checkpoint::from_var_store(&arch, &vs, Default::default())?;
    let params: usize = init.tensors.values().map(Tensor::numel).sum();
    println!(
        "device {device:?}, threads {}, batch {batch}, {params} parameters in {} tensors",
        tch::get_num_threads(),
        init.tensors.len()
    );
    let diffusion = GaussianDiffusion::from_config(
        &progdiff_stages::config::DiffusionConfig { steps: 1000, ..Default::default() },
        true,
    )?;
    let shape = [batch, 3, 32, 32];
    let x0 = Tensor::rand(shape, (Kind::Float, device)) * 2.0 - 1.0;
    let noise = Tensor::randn(shape, (Kind::Float, device));
    let t = Tensor::randint(1000, [batch], (Kind::Int64, device));
    let tp = TrainParams { weight_decay: 0.0, ..TrainParams::default() };

    // Two rounds, alternating, so drift on a shared machine shows.
    let mut step_ms = [0.0; 2];
    for (k, update) in
        [Update::PerTensor, Update::Flat, Update::PerTensor, Update::Flat].into_iter().enumerate()
    {
        let mut trainer = Trainer::new(&init, None, None, &tp, device, update)?;
        let (mut fb, mut up) = (0.0, 0.0);
        for i in 0..steps + 3 {
            sync(device);
            let t0 = Instant::now();
            let losses = diffusion.training_losses(|x, tm| trainer.forward(x, tm), &x0, &t, &noise);
            trainer.backward(&losses.loss.mean(Kind::Float));
            sync(device);
            let t1 = Instant::now();
            trainer.step(1e-4);
            sync(device);
            if i >= 3 {
                fb += (t1 - t0).as_secs_f64();
                up += t1.elapsed().as_secs_f64();
            }
        }
        let (fb, up) = (1e3 * fb / steps as f64, 1e3 * up / steps as f64);
        println!(
            "train {update:?}: step {:.2} ms = forward+backward {fb:.2} + AdamW/EMA {up:.2} ({:.1}% of the step)",
            fb + up,
            100.0 * up / (fb + up)
        );
        step_ms[k % 2] += fb + up;
    }
    println!("train: flat / per-tensor step time {:.3}x", step_ms[1] / step_ms[0]);

    // A sampling step: one eval forward at batch `batch`, and its noise.
    let net = init.build(&tch::nn::VarStore::new(device))?;
    let mut model_s = 0.0;
    let xt = noise.shallow_clone();
    let tm = Tensor::full([batch], 500.0, (Kind::Float, device));
    tch::no_grad(|| {
        for i in 0..steps + 2 {
            sync(device);
            let t0 = Instant::now();
            let _ = net.forward_t(&xt, &tm, false);
            sync(device);
            if i >= 2 {
                model_s += t0.elapsed().as_secs_f64();
            }
        }
    });
    let model_ms = 1e3 * model_s / steps as f64;
    let reps = steps * 5;
    let before = {
        let mut streams: Vec<SeededNoise> =
            (0..batch).map(|i| SeededNoise::stream(7, i as u64)).collect();
        let t0 = Instant::now();
        for _ in 0..reps {
            let rows: Vec<Tensor> = streams
                .iter_mut()
                .map(|s| {
                    let _ = std::thread::available_parallelism();
                    s.randn(&[1, 3, 32, 32], (Kind::Double, Device::Cpu))
                })
                .collect();
            let _ = Tensor::cat(&rows, 0).to_kind(Kind::Float).to_device(device);
        }
        sync(device);
        1e3 * t0.elapsed().as_secs_f64() / reps as f64
    };
    let after = {
        let mut n = ImageNoise::new(7, 0, batch as usize);
        let t0 = Instant::now();
        for _ in 0..reps {
            let _ = n.randn(&shape, (Kind::Float, device));
        }
        sync(device);
        1e3 * t0.elapsed().as_secs_f64() / reps as f64
    };
    println!(
        "sample step: model {model_ms:.2} ms; noise before {before:.3} ms ({:.1}% of the step), now {after:.3} ms ({:.1}%)",
        100.0 * before / (model_ms + before),
        100.0 * after / (model_ms + after)
    );
    Ok(())
}
