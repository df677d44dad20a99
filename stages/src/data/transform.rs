//! The per-image pipeline every dataset shares: u8 -> `[-1, 1]`, channel conversion, the
//! geometric fit to the target size (centre pad/crop or antialiased bilinear), horizontal flip.
//!
//! It runs on plain `f32` planes rather than tensors: one image at a time, on worker threads,
//! bit-for-bit the same on every machine.

use std::borrow::Cow;

use super::Resize;

/// One decoded image in the source's own size: channel-planar `u8` (`[C][H][W]`).
#[derive(Clone, Debug)]
pub(crate) struct RawImage<'a> {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Cow<'a, [u8]>,
}

/// ITU-R BT.601 luma weights (PIL's `convert("L")`); they sum to 1, so luma commutes with the
/// `[-1, 1]` scaling.
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// How to turn any source image into the dataset's `(C, H, W)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pipeline {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// How to reach `height` x `width` from another size ([`Resize::Exact`]: refuse).
    pub fit: Resize,
}

/// Why an image could not be fitted: its size, for the caller to name the file.
#[derive(Debug)]
pub(crate) struct SizeMismatch {
    pub height: usize,
    pub width: usize,
}

impl Pipeline {
    /// Number of `f32` values one output image takes.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Writes `img`, transformed, into `out` (`image_len()` values).
    pub fn apply(
        &self,
        img: &RawImage<'_>,
        flip: bool,
        out: &mut [f32],
    ) -> Result<(), SizeMismatch> {
        debug_assert_eq!(out.len(), self.image_len());
        let (h, w) = (img.height, img.width);
        let plane = h * w;
        // u8 -> [-1, 1], then channels.
        let scaled: Vec<f32> = img.pixels.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
        let planes: Vec<Cow<'_, [f32]>> = match (img.channels, self.channels) {
            (a, b) if a == b => scaled.chunks_exact(plane).map(Cow::Borrowed).collect(),
            (1, 3) => vec![Cow::Borrowed(&scaled[..]); 3],
            (3, 1) => {
                let (r, rest) = scaled.split_at(plane);
                let (g, b) = rest.split_at(plane);
                let luma = (0..plane).map(|k| LUMA[0] * r[k] + LUMA[1] * g[k] + LUMA[2] * b[k]);
                vec![Cow::Owned(luma.collect())]
            }
            (a, b) => {
                unreachable!("sources yield 1 or 3 channels and targets are 1 or 3: {a}->{b}")
            }
        };
        let (th, tw) = (self.height, self.width);
        let out_plane = th * tw;
        for (c, src) in planes.iter().enumerate() {
            let dst = &mut out[c * out_plane..(c + 1) * out_plane];
            if (h, w) == (th, tw) {
                dst.copy_from_slice(src);
            } else {
                match self.fit {
                    Resize::Exact => return Err(SizeMismatch { height: h, width: w }),
                    Resize::Pad => centre(src, h, w, dst, th, tw),
                    Resize::Bilinear => {
                        // Shorter side to the target, then centre-crop the longer one.
                        let s = (th as f64 / h as f64).max(tw as f64 / w as f64);
                        let nh = ((h as f64 * s).round() as usize).max(th);
                        let nw = ((w as f64 * s).round() as usize).max(tw);
                        let resized = resize_plane(src, h, w, nh, nw);
                        centre(&resized, nh, nw, dst, th, tw);
                    }
                }
            }
            if flip {
                for row in dst.chunks_exact_mut(tw) {
                    row.reverse();
                }
            }
        }
        Ok(())
    }
}

/// Places `src` (h x w) centred on `dst` (th x tw): pads with -1 (black) where smaller, keeps
/// the centre where larger. An odd margin puts the extra pixel at the bottom/right.
fn centre(src: &[f32], h: usize, w: usize, dst: &mut [f32], th: usize, tw: usize) {
    dst.fill(-1.0);
    // Offsets: where src row/col 0 lands in dst (pad) or which src row/col dst 0 shows (crop).
    let (pad_y, crop_y) = if th >= h { ((th - h) / 2, 0) } else { (0, (h - th) / 2) };
    let (pad_x, crop_x) = if tw >= w { ((tw - w) / 2, 0) } else { (0, (w - tw) / 2) };
    let rows = h.min(th);
    let cols = w.min(tw);
    for y in 0..rows {
        let s = (y + crop_y) * w + crop_x;
        let d = (y + pad_y) * tw + pad_x;
        dst[d..d + cols].copy_from_slice(&src[s..s + cols]);
    }
}

/// Antialiased bilinear (triangle filter) resize of one plane, as PIL's `BILINEAR`: plain
/// bilinear interpolation with half-pixel centres when enlarging, a triangle of width
/// proportional to the scale when shrinking (so downsampling averages instead of aliasing).
pub(crate) fn resize_plane(src: &[f32], h: usize, w: usize, nh: usize, nw: usize) -> Vec<f32> {
    let wx = filter_weights(w, nw);
    let wy = filter_weights(h, nh);
    let mut tmp = vec![0f32; h * nw];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for (x, (start, ws)) in wx.iter().enumerate() {
            tmp[y * nw + x] = ws.iter().enumerate().map(|(k, &c)| c * row[start + k]).sum();
        }
    }
    let mut out = vec![0f32; nh * nw];
    for (y, (start, ws)) in wy.iter().enumerate() {
        for x in 0..nw {
            out[y * nw + x] =
                ws.iter().enumerate().map(|(k, &c)| c * tmp[(start + k) * nw + x]).sum();
        }
    }
    out
}

/// For each output index: the first input index it reads and the normalised weights.
fn filter_weights(inp: usize, out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = inp as f64 / out as f64;
    let support = scale.max(1.0);
    (0..out)
        .map(|i| {
            let centre = (i as f64 + 0.5) * scale;
            let lo = (centre - support).floor().max(0.0) as usize;
            let hi = ((centre + support).ceil() as usize).min(inp).max(lo + 1);
            let raw: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5 - centre) / support).abs()).max(0.0))
                .collect();
            let sum: f64 = raw.iter().sum();
            let ws = if sum > 0.0 {
                raw.iter().map(|&v| (v / sum) as f32).collect()
            } else {
                // Cannot happen for inp, out >= 1; keep the nearest pixel rather than zeros.
                let mut v = vec![0f32; raw.len()];
                v[0] = 1.0;
                v
            };
            (lo, ws)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(c: usize, h: usize, w: usize, px: Vec<u8>) -> RawImage<'static> {
        RawImage { channels: c, height: h, width: w, pixels: Cow::Owned(px) }
    }

    #[test]
    fn same_size_resize_is_identity() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(resize_plane(&src, 3, 4, 3, 4), src);
    }

    #[test]
    fn halving_averages_pairs() {
        // 1 x 4 -> 1 x 2: a triangle of half-width 2 centred between each pair.
        let out = resize_plane(&[0.0, 1.0, 2.0, 3.0], 1, 4, 1, 2);
        // Output 0 centre at 1.0: inputs 0 (0.5 away) and 1 (0.5 away) weigh 0.75 each,
        // input 2 (1.5 away) 0.25; normalised over 1.75.
        assert!((out[0] - (0.75 * 0.0 + 0.75 * 1.0 + 0.25 * 2.0) / 1.75).abs() < 1e-6, "{out:?}");
        let c = resize_plane(&[0.5; 64], 8, 8, 3, 5);
        assert!(c.iter().all(|&v| (v - 0.5).abs() < 1e-6));
    }

    #[test]
    fn pad_centres_with_black_and_flip_mirrors() {
        let p = Pipeline { channels: 1, height: 4, width: 4, fit: Resize::Pad };
        let mut out = vec![0f32; 16];
        p.apply(&raw(1, 2, 2, vec![255, 0, 0, 255]), false, &mut out).unwrap();
        #[rustfmt::skip]
        let want = [-1., -1., -1., -1.,
                    -1.,  1., -1., -1.,
                    -1., -1.,  1., -1.,
                    -1., -1., -1., -1.];
        assert_eq!(out, want);
        p.apply(&raw(1, 2, 2, vec![255, 0, 0, 255]), true, &mut out).unwrap();
        assert_eq!(out[6], 1.0);
        assert_eq!(out[9], 1.0);
    }

    #[test]
    fn crop_keeps_the_centre() {
        let p = Pipeline { channels: 1, height: 1, width: 2, fit: Resize::Pad };
        let mut out = vec![0f32; 2];
        p.apply(&raw(1, 1, 4, vec![0, 255, 255, 0]), false, &mut out).unwrap();
        assert_eq!(out, [1.0, 1.0]);
    }

    #[test]
    fn gray_to_rgb_and_back() {
        let to_rgb = Pipeline { channels: 3, height: 1, width: 1, fit: Resize::Exact };
        let mut out = vec![0f32; 3];
        to_rgb.apply(&raw(1, 1, 1, vec![255]), false, &mut out).unwrap();
        assert_eq!(out, [1.0; 3]);
        let to_gray = Pipeline { channels: 1, height: 1, width: 1, fit: Resize::Exact };
        let mut g = vec![0f32; 1];
        to_gray.apply(&raw(3, 1, 1, vec![255, 0, 0]), false, &mut g).unwrap();
        assert!((g[0] - (0.299 - 0.701)).abs() < 1e-6);
    }

    #[test]
    fn mismatched_size_without_fit_is_reported() {
        let p = Pipeline { channels: 1, height: 2, width: 2, fit: Resize::Exact };
        let e = p.apply(&raw(1, 1, 1, vec![0]), false, &mut [0.0; 4]).unwrap_err();
        assert_eq!((e.height, e.width), (1, 1));
    }
}
