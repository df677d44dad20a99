//! Shared plotting support: PNG charts through plotters' bitmap backend, with text drawn by
//! ab_glyph from a font file registered at run time (there is no system font lookup).
//!
//! Plots are a courtesy: when no font file is found they are drawn without text, never failing
//! the stage that draws them.

use std::sync::OnceLock;

use plotters::style::{FontStyle, register_font};

/// The family name progdiff registers its font under. Deliberately not plotters' default
/// `sans-serif`, so that any text drawn without naming this family fails loudly in tests instead
/// of depending on whether a font happened to be registered.
pub const FONT_FAMILY: &str = "progdiff-sans";

/// Where DejaVu Sans lives on Debian/Ubuntu (`fonts-dejavu-core`), Fedora and Arch.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// The font family to draw text with, registering it on first use; `None` when no font file
/// from [`FONT_PATHS`] can be loaded (then draw without text).
pub fn text_font() -> Option<&'static str> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered = *REGISTERED.get_or_init(|| {
        for path in FONT_PATHS {
            let Ok(bytes) = std::fs::read(path) else { continue };
            // plotters keeps fonts for the life of the process; registration happens once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
                tracing::debug!(path, "registered plot font");
                return true;
            }
            tracing::debug!(path, "not a usable font");
        }
        tracing::warn!("no DejaVu Sans font found; plots are drawn without text");
        false
    });
    registered.then_some(FONT_FAMILY)
}
