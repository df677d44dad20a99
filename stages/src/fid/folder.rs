//! Images of a folder as one uint8 tensor, for `progdiff fid` on folders of samples.

use std::path::Path;

use tch::Tensor;

use super::FidError;

/// Every `.png` / `.jpg` / `.jpeg` file directly in `dir`, in name order, as uint8
/// `[N, channels, H, W]` (`channels` 1: converted to grayscale, 3: to RGB, as pytorch-fid's
/// `convert('RGB')`). All images must have the size of the first.
pub fn load_folder(dir: &Path, channels: usize) -> Result<Tensor, FidError> {
    let err = |path: &Path, message: String| FidError::Folder { path: path.to_path_buf(), message };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(dir, "has no .png or .jpg images".into()));
    }
    let mut pixels = Vec::new();
    let mut size = None;
    for f in &files {
        let img = image::open(f).map_err(|e| err(f, e.to_string()))?;
        let (w, h, bytes) = match channels {
            1 => {
                let g = img.to_luma8();
                (g.width(), g.height(), g.into_raw())
            }
            _ => {
                let rgb = img.to_rgb8();
                let (w, h) = (rgb.width(), rgb.height());
                // HWC -> CHW
                let raw = rgb.into_raw();
                let plane = (w * h) as usize;
                let mut chw = vec![0u8; raw.len()];
                for (i, px) in raw.chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        chw[c * plane + i] = px[c];
                    }
                }
                (w, h, chw)
            }
        };
        match size {
            None => size = Some((w, h)),
            Some(s) if s != (w, h) => {
                return Err(err(f, format!("is {w}x{h}, but the first image is {}x{}", s.0, s.1)));
            }
            Some(_) => {}
        }
        pixels.extend_from_slice(&bytes);
    }
    let (w, h) = size.expect("at least one image");
    let c = if channels == 1 { 1 } else { 3 };
    Ok(Tensor::from_slice(&pixels).view([files.len() as i64, c, h as i64, w as i64]))
}
