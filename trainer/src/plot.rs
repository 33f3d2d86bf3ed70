//! Line charts written as PNG files (the ablation's curves): a raster of its own, a 5x7
//! bitmap font for titles, tick labels and the legend, and the `png` crate to encode. No
//! fonts or plotting libraries are needed at run time.

use std::io::BufWriter;
use std::path::Path;

/// One curve: (x, y) points in order of x; non-finite points are skipped.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title, axis names and its curves.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// Distinguishable line colours (RGB), cycled by series.
const COLOURS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [23, 190, 207],
];

const PANEL_W: usize = 720;
const PANEL_H: usize = 360;
/// Room for tick labels (left, bottom), the title (top) and the legend (right).
const LEFT: usize = 64;
const BOTTOM: usize = 40;
const TOP: usize = 28;
const RIGHT: usize = 190;

/// An RGB raster.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![255; width * height * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, colour: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let at = (y as usize * self.width + x as usize) * 3;
            self.pixels[at..at + 3].copy_from_slice(&colour);
        }
    }

    /// A line two pixels wide (Bresenham, doubled vertically).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), colour: [u8; 3], thick: bool) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, colour);
            if thick {
                self.set(x, y + 1, colour);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, colour: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, colour);
            }
        }
    }

    /// Text at (x, y) (top left), 6 pixels per character.
    fn text(&mut self, x: i64, y: i64, text: &str, colour: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.set(x + 6 * i as i64 + col, y + r as i64, colour);
                    }
                }
            }
        }
    }

    /// Text rotated a quarter turn counter-clockwise, reading bottom to top from (x, y).
    fn text_up(&mut self, x: i64, y: i64, text: &str, colour: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.set(x + r as i64, y - 6 * i as i64 - col, colour);
                    }
                }
            }
        }
    }
}

/// "Nice" tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
fn ticks(lo: f64, hi: f64, at_most: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / at_most.max(1) as f64;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A tick label: short, no trailing zeros.
fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        return format!("{v:.0e}");
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn draw_panel(canvas: &mut Canvas, top: usize, chart: &Chart) {
    let black = [0, 0, 0];
    let grey = [225, 225, 225];
    let points = || {
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points() {
        (x_lo, x_hi, y_lo, y_hi) = (x_lo.min(x), x_hi.max(x), y_lo.min(y), y_hi.max(y));
    }
    if x_lo > x_hi {
        (x_lo, x_hi, y_lo, y_hi) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y_hi - y_lo) * 0.05).max(1e-6);
    (y_lo, y_hi) = (y_lo - pad, y_hi + pad);
    if x_hi == x_lo {
        x_hi = x_lo + 1.0;
    }
    let (left, right) = (LEFT as i64, (PANEL_W - RIGHT) as i64);
    let (upper, lower) = ((top + TOP) as i64, (top + PANEL_H - BOTTOM) as i64);
    let px = |x: f64| left + ((x - x_lo) / (x_hi - x_lo) * (right - left) as f64).round() as i64;
    let py = |y: f64| lower - ((y - y_lo) / (y_hi - y_lo) * (lower - upper) as f64).round() as i64;
    for t in ticks(y_lo, y_hi, 6) {
        let y = py(t);
        canvas.line((left, y), (right, y), grey, false);
        let text = label(t);
        canvas.text(left - 6 - 6 * text.len() as i64, y - 3, &text, black);
    }
    for t in ticks(x_lo, x_hi, 8) {
        let x = px(t);
        canvas.line((x, upper), (x, lower), grey, false);
        let text = label(t);
        canvas.text(x - 3 * text.len() as i64, lower + 6, &text, black);
    }
    canvas.line((left, upper), (left, lower), black, false);
    canvas.line((left, lower), (right, lower), black, false);
    canvas.text(left, (top + 8) as i64, &chart.title, black);
    let x_name = &chart.x_label;
    canvas.text(
        (left + right) / 2 - 3 * x_name.len() as i64,
        lower + 22,
        x_name,
        black,
    );
    canvas.text_up(
        6,
        (upper + lower) / 2 + 3 * chart.y_label.len() as i64,
        &chart.y_label,
        black,
    );
    for (i, series) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut last = None;
        for &(x, y) in series
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
        {
            let p = (px(x), py(y));
            if let Some(prev) = last {
                canvas.line(prev, p, colour, true);
            } else {
                canvas.rect(p.0 - 1, p.1 - 1, 3, 3, colour);
            }
            last = Some(p);
        }
        let y = upper + 4 + 14 * i as i64;
        canvas.rect(right + 12, y, 14, 4, colour);
        canvas.text(right + 32, y - 2, &series.label, black);
    }
}

/// Writes the charts, stacked top to bottom, as one PNG image.
pub fn write_png(path: &Path, charts: &[Chart]) -> std::io::Result<()> {
    let mut canvas = Canvas::new(PANEL_W, PANEL_H * charts.len().max(1));
    for (i, chart) in charts.iter().enumerate() {
        draw_panel(&mut canvas, i * PANEL_H, chart);
    }
    let file = std::fs::File::create(path)?;
    let mut encoder = png::Encoder::new(
        BufWriter::new(file),
        canvas.width as u32,
        canvas.height as u32,
    );
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
    writer
        .write_image_data(&canvas.pixels)
        .map_err(std::io::Error::other)?;
    writer.finish().map_err(std::io::Error::other)
}

/// The 5x7 bitmap of `c` (rows top to bottom, bit 4 the leftmost column); letters in
/// either case draw as capitals, anything unknown as a box.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        ' ' => [0; 7],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '\'' => [0x04, 0x04, 0, 0, 0, 0, 0],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        let t = ticks(0.93, 2.71, 6);
        assert!(t.len() >= 3 && t.len() <= 7, "{t:?}");
        assert!(t.iter().all(|v| (0.93..=2.71).contains(v)));
        let step = t[1] - t[0];
        assert!(
            [0.2, 0.5, 1.0].iter().any(|s| (step - s).abs() < 1e-9),
            "{t:?}"
        );
        assert_eq!(label(0.5), "0.5");
        assert_eq!(label(2.0), "2");
    }

    #[test]
    fn a_chart_is_a_png_with_its_curves_in_colour() {
        let dir = std::env::temp_dir().join(format!("plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chart.png");
        let chart = Chart {
            title: "max/mean load".into(),
            x_label: "step".into(),
            y_label: "load".into(),
            series: vec![
                Series {
                    label: "a".into(),
                    points: (0..50)
                        .map(|i| (i as f64, 1.0 + 1.0 / (1.0 + i as f64)))
                        .collect(),
                },
                Series {
                    label: "b".into(),
                    points: vec![(0.0, 1.5), (49.0, 1.2)],
                },
            ],
        };
        write_png(&path, &[chart.clone(), chart]).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!(
            (info.width as usize, info.height as usize),
            (PANEL_W, 2 * PANEL_H)
        );
        // Both series' colours are drawn.
        for colour in &COLOURS[..2] {
            let n = pixels.chunks(3).filter(|p| p == colour).count();
            assert!(n > 50, "{colour:?}: {n} pixels");
        }
    }
}
