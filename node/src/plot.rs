//! `p2ptrain plot`: a run's loss and accuracy curves as a PNG.
//!
//! Draws with a small rasterizer of our own into an RGB buffer and encodes it
//! with the `png` crate: a plotting library would need a font from the
//! system (or a bundled TTF) for its labels, while these charts need lines,
//! markers and a few numbers, which a 3×5 digit font covers. Each node's curve
//! has its colour from [`NODE_COLORS`]; the average over nodes is drawn
//! thicker in [`AVERAGE_COLOR`] on top.

use crate::run_record::{read_run_dir, NodeRun, Record, RunRecordError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Width of the image in pixels.
pub const WIDTH: u32 = 900;
/// Height of one panel (loss; accuracy below it when any node evaluated accuracy).
pub const PANEL_HEIGHT: u32 = 320;
/// Colours of the nodes' curves, in node order (repeating past eight nodes).
pub const NODE_COLORS: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
];
/// Colour of the curve averaged over nodes.
pub const AVERAGE_COLOR: [u8; 3] = [0, 0, 0];

const BACKGROUND: [u8; 3] = [255, 255, 255];
const FRAME: [u8; 3] = [110, 110, 110];
const GRID: [u8; 3] = [225, 225, 225];
const MARGIN_LEFT: i64 = 70;
const MARGIN_RIGHT: i64 = 20;
const MARGIN_TOP: i64 = 20;
const MARGIN_BOTTOM: i64 = 30;

/// Why a plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The run records could not be read.
    #[error(transparent)]
    Records(#[from] RunRecordError),
    /// The records hold no finite loss to draw.
    #[error("the run records in {} hold no round with a loss to plot", .0.display())]
    NoData(PathBuf),
    /// The output exists and is not a PNG (a plot drawn before), and
    /// `--force` was not given.
    #[error("{} exists and is not a plot drawn by `p2ptrain plot`; pass --force to replace it", .0.display())]
    WouldReplace(PathBuf),
    /// The output is a run record (one plotted, say) or a checkpoint: never
    /// replaced, `--force` or not.
    #[error("{} is a run record or a checkpoint; plot writes over neither, --force or not: give another --out", .0.display())]
    WouldReplaceRunData(PathBuf),
    /// The PNG could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// An RGB image, row by row.
#[derive(Debug, Clone)]
pub struct Image {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Three bytes per pixel.
    pub rgb: Vec<u8>,
}

impl Image {
    fn new(width: u32, height: u32) -> Image {
        let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
        for _ in 0..width as usize * height as usize {
            rgb.extend_from_slice(&BACKGROUND);
        }
        Image { width, height, rgb }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && x < i64::from(self.width) && y < i64::from(self.height) {
            let i = (y as usize * self.width as usize + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    fn square(&mut self, cx: i64, cy: i64, half: i64, c: [u8; 3]) {
        for y in cy - half..=cy + half {
            for x in cx - half..=cx + half {
                self.set(x, y, c);
            }
        }
    }

    /// A line `2*half+1` pixels thick (Bresenham, stamping squares).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), half: i64, c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.square(x, y, half, c);
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

    /// Encodes the image as an 8-bit RGB PNG.
    pub fn encode_png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let (keyword, text) = PLOT_MARK;
        encoder.add_text_chunk(keyword.into(), text.into())?;
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&self.rgb)?;
        writer.finish()?;
        Ok(out)
    }

    /// Writes `text` (digits, `.`, `-`, `e`, `%`) with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, text: &str, c: [u8; 3]) {
        const SCALE: i64 = 2;
        for (i, ch) in text.chars().enumerate() {
            let Some(rows) = glyph(ch) else { continue };
            let gx = x + i as i64 * 4 * SCALE;
            for (ry, bits) in rows.iter().enumerate() {
                for rx in 0..3 {
                    if bits & (0b100 >> rx) != 0 {
                        for py in 0..SCALE {
                            for px in 0..SCALE {
                                self.set(gx + rx * SCALE + px, y + ry as i64 * SCALE + py, c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A 3×5 bitmap of the characters axis labels need.
fn glyph(ch: char) -> Option<[u8; 5]> {
    Some(match ch {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        'e' => [0b000, 0b111, 0b111, 0b100, 0b111],
        '%' => [0b101, 0b001, 0b010, 0b100, 0b101],
        _ => return None,
    })
}

/// One curve: (step, value) points and how to draw them.
struct Curve {
    points: Vec<(f64, f64)>,
    color: [u8; 3],
    half: i64,
}

/// A rectangle of the image with data ranges mapped onto it.
struct Panel {
    top: i64,
    height: i64,
    x_max: f64,
    y_min: f64,
    y_max: f64,
}

impl Panel {
    fn to_px(&self, (x, y): (f64, f64), width: i64) -> (i64, i64) {
        let w = (width - MARGIN_LEFT - MARGIN_RIGHT) as f64;
        let h = (self.height - MARGIN_TOP - MARGIN_BOTTOM) as f64;
        let fx = (x / self.x_max.max(1e-12)).clamp(0.0, 1.0);
        let fy = ((y - self.y_min) / (self.y_max - self.y_min).max(1e-12)).clamp(0.0, 1.0);
        (
            MARGIN_LEFT + (fx * w).round() as i64,
            self.top + MARGIN_TOP + ((1.0 - fy) * h).round() as i64,
        )
    }

    fn draw(&self, img: &mut Image, curves: &[Curve], percent: bool) {
        let width = i64::from(img.width);
        let (left, right) = (MARGIN_LEFT, width - MARGIN_RIGHT);
        let (top, bottom) = (
            self.top + MARGIN_TOP,
            self.top + self.height - MARGIN_BOTTOM,
        );
        for i in 1..4 {
            let y = top + (bottom - top) * i / 4;
            img.line((left, y), (right, y), 0, GRID);
        }
        img.line((left, top), (left, bottom), 0, FRAME);
        img.line((left, bottom), (right, bottom), 0, FRAME);
        let label = |v: f64| {
            if percent {
                format!("{:.0}%", v * 100.0)
            } else {
                format_number(v)
            }
        };
        img.text(4, top - 4, &label(self.y_max), FRAME);
        img.text(4, bottom - 10, &label(self.y_min), FRAME);
        let x_label = format!("{:.0}", self.x_max);
        img.text(
            right - x_label.len() as i64 * 8,
            bottom + 8,
            &x_label,
            FRAME,
        );
        img.text(left, bottom + 8, "0", FRAME);
        for curve in curves {
            let px: Vec<(i64, i64)> = curve.points.iter().map(|p| self.to_px(*p, width)).collect();
            if px.len() == 1 {
                // A lone point (an evaluation at the end) is a marker; the
                // nodes' markers are larger so they show around the average's.
                let half = if curve.color == AVERAGE_COLOR { 2 } else { 4 };
                img.square(px[0].0, px[0].1, half, curve.color);
            }
            for pair in px.windows(2) {
                img.line(pair[0], pair[1], curve.half, curve.color);
            }
        }
    }
}

fn format_number(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-2) {
        format!("{v:.1e}")
    } else {
        format!("{v:.2}")
    }
}

/// Per-node and averaged curves of one figure, picked out of the records.
fn curves(
    runs: &[NodeRun],
    pick: impl Fn(&Record) -> Option<(u64, f64, f64)>,
) -> (Vec<Curve>, Option<Curve>) {
    let mut per_node = Vec::new();
    // round -> (sum of steps, sum of values, count), for the average.
    let mut by_round: BTreeMap<u64, (f64, f64, usize)> = BTreeMap::new();
    for (i, run) in runs.iter().enumerate() {
        let mut points = Vec::new();
        for (round, step, value) in run.records.iter().filter_map(&pick) {
            if !value.is_finite() {
                continue;
            }
            points.push((step, value));
            let e = by_round.entry(round).or_default();
            *e = (e.0 + step, e.1 + value, e.2 + 1);
        }
        if !points.is_empty() {
            per_node.push(Curve {
                points,
                color: NODE_COLORS[i % NODE_COLORS.len()],
                half: 0,
            });
        }
    }
    let average = (!by_round.is_empty()).then(|| Curve {
        points: by_round
            .values()
            .map(|(s, v, n)| (s / *n as f64, v / *n as f64))
            .collect(),
        color: AVERAGE_COLOR,
        half: 1,
    });
    (per_node, average)
}

/// Draws the loss panel and, if any node evaluated accuracy, the accuracy panel.
pub fn render(runs: &[NodeRun], dir: &Path) -> Result<Image, PlotError> {
    let (loss_nodes, loss_avg) = curves(runs, |r| match r {
        Record::Round {
            round,
            step,
            loss: Some(l),
            ..
        } => Some((*round, *step as f64, f64::from(*l))),
        _ => None,
    });
    let Some(loss_avg) = loss_avg else {
        return Err(PlotError::NoData(dir.to_path_buf()));
    };
    let (acc_nodes, acc_avg) = curves(runs, |r| match r {
        Record::Eval {
            round,
            step,
            accuracy: Some(a),
            ..
        } => Some((*round, *step as f64, f64::from(*a))),
        _ => None,
    });
    let panels = if acc_avg.is_some() { 2 } else { 1 };
    let mut img = Image::new(WIDTH, PANEL_HEIGHT * panels);
    let all = |nodes: &[Curve], avg: &Curve| -> Vec<(f64, f64)> {
        nodes
            .iter()
            .chain(std::iter::once(avg))
            .flat_map(|c| c.points.iter().copied())
            .collect()
    };
    let loss_points = all(&loss_nodes, &loss_avg);
    let acc_points = acc_avg
        .as_ref()
        .map(|a| all(&acc_nodes, a))
        .unwrap_or_default();
    let x_max = loss_points
        .iter()
        .chain(&acc_points)
        .map(|p| p.0)
        .fold(1.0, f64::max);
    let y_max = loss_points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let y_min = loss_points.iter().map(|p| p.1).fold(0.0, f64::min);
    let mut loss_curves = loss_nodes;
    loss_curves.push(loss_avg);
    Panel {
        top: 0,
        height: i64::from(PANEL_HEIGHT),
        x_max,
        y_min,
        y_max: if y_max > y_min {
            y_max * 1.05
        } else {
            y_min + 1.0
        },
    }
    .draw(&mut img, &loss_curves, false);
    if let Some(avg) = acc_avg {
        let mut acc_curves = acc_nodes;
        acc_curves.push(avg);
        Panel {
            top: i64::from(PANEL_HEIGHT),
            height: i64::from(PANEL_HEIGHT),
            x_max,
            y_min: 0.0,
            y_max: 1.0,
        }
        .draw(&mut img, &acc_curves, true);
    }
    legend(&mut img, runs.len());
    Ok(img)
}

/// One colour square per node in the top-right corner, then the average's.
fn legend(img: &mut Image, nodes: usize) {
    let right = i64::from(img.width) - MARGIN_RIGHT - 8;
    let shown = nodes.min(NODE_COLORS.len());
    let colors = NODE_COLORS[..shown]
        .iter()
        .chain(std::iter::once(&AVERAGE_COLOR));
    for (i, color) in colors.enumerate() {
        img.square(right - (shown - i) as i64 * 16, MARGIN_TOP + 6, 5, *color);
    }
}

/// The text chunk every plot carries, so a later `plot` knows the file at
/// `--out` for one of its own, not a picture of the user's.
const PLOT_MARK: (&str, &str) = ("Software", "p2ptrain plot");

/// Whether `path` is a plot this command drew: a regular file (checked
/// before opening, so a named pipe cannot block us) that starts like a PNG
/// and carries [`PLOT_MARK`] in its first chunks.
fn is_our_plot(path: &Path) -> bool {
    use std::io::Read;
    if !path.is_file() {
        return false;
    }
    let mut head = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(4096).read_to_end(&mut head));
    let (keyword, text) = PLOT_MARK;
    let mark = [b"tEXt", keyword.as_bytes(), b"\0", text.as_bytes()].concat();
    read.is_ok()
        && head.starts_with(b"\x89PNG\r\n\x1a\n")
        && head.windows(mark.len()).any(|w| w == mark)
}

/// What [`plot_run_dir`] drew.
#[derive(Debug, Clone)]
pub struct Plotted {
    /// Nodes whose records were found.
    pub nodes: usize,
    /// Image size.
    pub width: u32,
    /// Image size.
    pub height: u32,
}

/// Reads the records under `dir` and writes their plot to `out`. A plot
/// drawn before is replaced; any other file at `out` only with `force`.
pub fn plot_run_dir(dir: &Path, out: &Path, force: bool) -> Result<Plotted, PlotError> {
    if crate::run_record::is_run_data(out) {
        return Err(PlotError::WouldReplaceRunData(out.to_path_buf()));
    }
    if !force && out.symlink_metadata().is_ok() && !is_our_plot(out) {
        return Err(PlotError::WouldReplace(out.to_path_buf()));
    }
    let runs = read_run_dir(dir)?;
    let img = render(&runs, dir)?;
    let write_err = |source| PlotError::Write {
        path: out.to_path_buf(),
        source,
    };
    let bytes = img
        .encode_png()
        .map_err(|e| write_err(std::io::Error::other(e)))?;
    crate::small_file::write_atomically(out, &bytes).map_err(write_err)?;
    Ok(Plotted {
        nodes: runs.len(),
        width: img.width,
        height: img.height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, offset: f32, accuracy: Option<f32>) -> NodeRun {
        let mut records: Vec<Record> = (1..=20)
            .map(|r| Record::Round {
                round: r,
                step: r * 10,
                loss: Some(2.0 / r as f32 + offset),
                samples: r * 640,
                time_s: r as f64,
            })
            .collect();
        records.push(Record::Eval {
            round: 20,
            step: 200,
            loss: Some(0.3),
            accuracy,
            time_s: 21.0,
        });
        NodeRun {
            name: name.into(),
            records,
        }
    }

    fn count(img: &Image, c: [u8; 3]) -> usize {
        img.rgb.chunks(3).filter(|p| *p == c).count()
    }

    #[test]
    fn draws_every_node_and_the_average() {
        let runs = [run("node-0", 0.0, Some(0.9)), run("node-1", 0.5, Some(0.8))];
        let img = render(&runs, Path::new(".")).unwrap();
        assert_eq!((img.width, img.height), (WIDTH, 2 * PANEL_HEIGHT));
        for c in [NODE_COLORS[0], NODE_COLORS[1], AVERAGE_COLOR] {
            assert!(count(&img, c) > 100, "colour {c:?} missing");
        }
        // Only the legend's square may carry a third node's colour.
        assert!(count(&img, NODE_COLORS[2]) == 0);
    }

    #[test]
    fn no_accuracy_means_one_panel_and_no_loss_is_an_error() {
        let img = render(&[run("a", 0.0, None)], Path::new(".")).unwrap();
        assert_eq!(img.height, PANEL_HEIGHT);
        let empty = NodeRun {
            name: "a".into(),
            records: vec![],
        };
        let err = render(&[empty], Path::new("somewhere")).unwrap_err();
        assert!(err.to_string().contains("somewhere"), "{err}");
    }

    #[test]
    fn png_round_trips() {
        let img = render(&[run("a", 0.0, None)], Path::new(".")).unwrap();
        let bytes = img.encode_png().unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        assert_eq!(reader.info().width, WIDTH);
    }
}
