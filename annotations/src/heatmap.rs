//! A heat picture of a disk as a PNG.

use std::io;

/// Largest picture [`render_heatmap_png`] draws, in pixels.
pub const MAX_HEATMAP_PIXELS: u64 = 1 << 26;

/// Colour of grid lines (drawn when `cell >= 4`).
const GRID: [u8; 3] = [48, 48, 48];

/// The colour of heat `h` on a log scale where `max` is the largest heat: 0 is black, then dark
/// red to red (first third of the scale), red to yellow (second third), yellow to white (last
/// third); `max` is white.
pub fn heat_colour(h: u64, max: u64) -> [u8; 3] {
    if h == 0 || max == 0 {
        return [0, 0, 0];
    }
    let t = ((h.min(max) as f64).ln_1p() / (max as f64).ln_1p()).clamp(0.0, 1.0);
    // Heat 1 of a huge maximum still shows as a visible dark red.
    let t = 0.05 + 0.95 * t;
    let ramp = |x: f64| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
    [ramp(t * 3.0), ramp(t * 3.0 - 1.0), ramp(t * 3.0 - 2.0)]
}

/// Draws a heat picture as PNG (8-bit RGB) into `out`: `heat[i]` is the heat of the `i`-th equal
/// part of the disk (e.g. [`crate::Table::histogram`]), laid out row by row, `columns` cells per
/// row, each cell `cell` × `cell` pixels; the picture is `columns·cell` wide and
/// `ceil(len / columns)·cell` high (at least one row). Colours are [`heat_colour`] against the
/// largest heat; cells after the last part are black. When `cell >= 4` the last pixel row and
/// column of every cell are a dark grey grid line.
///
/// Errors: `InvalidInput` if `columns` or `cell` is 0 or the picture would exceed
/// [`MAX_HEATMAP_PIXELS`]; otherwise the errors of `out`.
pub fn render_heatmap_png(
    heat: &[u64],
    columns: u32,
    cell: u32,
    out: &mut dyn io::Write,
) -> io::Result<()> {
    if columns == 0 || cell == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "heatmap: columns and cell must be positive",
        ));
    }
    let rows = (heat.len() as u64).div_ceil(u64::from(columns)).max(1);
    let width = u64::from(columns) * u64::from(cell);
    let height = rows * u64::from(cell);
    if width.saturating_mul(height) > MAX_HEATMAP_PIXELS || height > u64::from(u32::MAX) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("heatmap: {width}x{height} pixels is too large (at most {MAX_HEATMAP_PIXELS})"),
        ));
    }
    let max = heat.iter().copied().max().unwrap_or(0);
    let (w, h) = (width as usize, height as usize);
    let (cols, cell) = (columns as usize, cell as usize);
    let grid = cell >= 4;
    let mut data = vec![0u8; w * h * 3];
    for (row_px, line) in data.chunks_exact_mut(w * 3).enumerate() {
        let row = row_px / cell;
        let grid_row = grid && row_px % cell == cell - 1;
        for (x, px) in line.chunks_exact_mut(3).enumerate() {
            let col = x / cell;
            let colour = if grid_row || (grid && x % cell == cell - 1) {
                GRID
            } else {
                match heat.get(row * cols + col) {
                    Some(&v) => heat_colour(v, max),
                    None => [0, 0, 0],
                }
            };
            px.copy_from_slice(&colour);
        }
    }
    let mut enc = png::Encoder::new(out, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&data)?;
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_scale() {
        assert_eq!(heat_colour(0, 100), [0, 0, 0]);
        assert_eq!(heat_colour(100, 100), [255, 255, 255]);
        let low = heat_colour(1, 1_000_000_000);
        assert!(low[0] > 0 && low[1] == 0 && low[2] == 0, "{low:?}");
        // Monotonic brightness.
        let mut prev = 0u32;
        for h in [1u64, 10, 100, 1000, 10_000] {
            let c = heat_colour(h, 10_000);
            let sum: u32 = c.iter().map(|&v| u32::from(v)).sum();
            assert!(sum >= prev);
            prev = sum;
        }
    }

    #[test]
    fn bad_arguments() {
        let mut v = Vec::new();
        assert!(render_heatmap_png(&[1], 0, 4, &mut v).is_err());
        assert!(render_heatmap_png(&[1], 4, 0, &mut v).is_err());
        assert!(render_heatmap_png(&[1], 100_000, 100_000, &mut v).is_err());
    }
}
