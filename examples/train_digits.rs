//! Trains a 64-128-10 MLP on the 8x8 handwritten digits in `data/digits.csv`
//! (80/20 split, fixed seed), prints the metrics of each epoch, saves the
//! weights to `digits_mlp.safetensors`, reloads them into a fresh model to
//! check the accuracy is identical, and draws the loss and accuracy curves
//! to `digits_curves.png` (skipped with `--no-plot`). The last line printed
//! is `test accuracy: 0.xxxx`.
//!
//! Run with `cargo run --release --example train_digits [-- --no-plot]`
//! (`-- --help` prints the usage and trains nothing). Output files go to the
//! current directory; the data is found from the crate's directory, so it
//! runs from anywhere.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use netcl::data::{self, TensorDataset};
use netcl::io;
use netcl::nn::{Activation, Mlp, Module};
use netcl::optim::{Adam, AdamConfig, CosineAnnealing};
use netcl::rand::SeedableRng;
use netcl::rand::rngs::StdRng;
use netcl::train::{self, EpochMetrics, Trainer};

const SEED: u64 = 42;
const EPOCHS: usize = 30;
const BATCH_SIZE: usize = 32;
const WEIGHTS: &str = "digits_mlp.safetensors";
const CURVES: &str = "digits_curves.png";

/// Trains a 64-128-10 MLP on the 8x8 handwritten digits of data/digits.csv,
/// saves it to digits_mlp.safetensors, reloads it to check the accuracy is
/// identical, and draws the learning curves to digits_curves.png.
#[derive(Parser, Debug)]
#[command(name = "train_digits")]
struct Args {
    /// Do not draw the loss and accuracy curves.
    #[arg(long)]
    no_plot: bool,
}

fn main() -> ExitCode {
    // `--help` and unknown flags end here, before any work.
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let plot = !args.no_plot;

    // The data: 1797 images of 64 pixels in 0..=16, scaled to [0, 1].
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv");
    let digits = data::load_digits(&path)?;
    let digits = TensorDataset::new(digits.inputs() / 16.0, digits.targets().clone())?;
    let (train_set, test_set) = digits.split(0.8, SEED)?;
    println!(
        "digits: {} training and {} test samples",
        train_set.inputs().shape()[0],
        test_set.inputs().shape()[0]
    );

    // The model and its training.
    let mut rng = StdRng::seed_from_u64(SEED);
    let model = Mlp::new(&[64, 128, 10], Activation::Relu, &mut rng);
    let optimizer = Adam::new(model.parameters(), AdamConfig::new(2e-3));
    let mut trainer = Trainer::new(model, optimizer, train_set)
        .batch_size(BATCH_SIZE)
        .seed(SEED)
        .eval_set(test_set.clone())
        .schedule(CosineAnnealing::new(2e-3, 1e-5, EPOCHS));
    for _ in 0..EPOCHS {
        for metrics in trainer.fit(1)? {
            println!("{metrics}");
        }
    }
    let result = trainer.evaluate()?;
    let seconds: f64 = trainer.history().iter().map(|m| m.seconds).sum();
    println!("trained {EPOCHS} epochs in {seconds:.2} s");

    // Save, reload into a model initialised differently, and compare.
    io::save(trainer.model(), WEIGHTS)?;
    let fresh = Mlp::new(
        &[64, 128, 10],
        Activation::Relu,
        &mut StdRng::seed_from_u64(SEED + 1),
    );
    io::load(&fresh, WEIGHTS)?;
    let reloaded = train::evaluate(&fresh, &test_set, 256)?;
    println!(
        "saved {WEIGHTS}; reloaded model: test accuracy {:.4}, loss {:.4}",
        reloaded.accuracy, reloaded.loss
    );
    if reloaded.accuracy != result.accuracy {
        return Err(format!(
            "reloaded accuracy {} differs from trained accuracy {}",
            reloaded.accuracy, result.accuracy
        )
        .into());
    }

    if plot {
        plot::curves(trainer.history(), CURVES)?;
        println!("wrote {CURVES}");
    }
    println!("test accuracy: {:.4}", result.accuracy);
    Ok(())
}

/// Loss and accuracy curves with plotters' bitmap backend. That backend has
/// no font without system libraries, so labels are drawn with a small pixel
/// font of our own.
mod plot {
    use plotters::coord::Shift;
    use plotters::prelude::*;

    use super::EpochMetrics;

    type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
    type PlotResult = Result<(), Box<dyn std::error::Error>>;

    const TRAIN: RGBColor = RGBColor(31, 119, 180);
    const EVAL: RGBColor = RGBColor(214, 39, 40);
    const GRID: RGBColor = RGBColor(225, 225, 225);

    /// A curve: its name in the legend, colour and points.
    struct Curve<'a> {
        name: &'a str,
        color: RGBColor,
        points: Vec<(f32, f32)>,
    }

    pub(super) fn curves(history: &[EpochMetrics], path: &str) -> PlotResult {
        let root = BitMapBackend::new(path, (1000, 440)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(500);
        let epoch = |m: &EpochMetrics| (m.epoch + 1) as f32;
        let loss = [
            Curve {
                name: "train",
                color: TRAIN,
                points: history.iter().map(|m| (epoch(m), m.train_loss)).collect(),
            },
            Curve {
                name: "eval",
                color: EVAL,
                points: history
                    .iter()
                    .filter_map(|m| Some((epoch(m), m.eval_loss()?)))
                    .collect(),
            },
        ];
        let accuracy = [Curve {
            name: "eval",
            color: EVAL,
            points: history
                .iter()
                .filter_map(|m| Some((epoch(m), m.eval_accuracy()?)))
                .collect(),
        }];
        let max_loss = loss
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.1))
            .fold(0.0_f32, f32::max);
        let min_accuracy = accuracy[0]
            .points
            .iter()
            .map(|p| p.1)
            .fold(1.0_f32, f32::min);
        let epochs = history.len().max(2) as f32;
        panel(
            &root,
            &left,
            "loss",
            &loss,
            epochs,
            (0.0, nice_ceil(max_loss)),
        )?;
        let low = ((min_accuracy * 10.0).floor() / 10.0).min(0.9);
        panel(&root, &right, "accuracy", &accuracy, epochs, (low, 1.0))?;
        root.present()?;
        Ok(())
    }

    /// One chart: frame, grid, tick labels, curves, title and legend.
    fn panel(
        root: &Area<'_>,
        area: &Area<'_>,
        title: &str,
        curves: &[Curve<'_>],
        epochs: f32,
        (y_low, y_high): (f32, f32),
    ) -> PlotResult {
        let mut chart = ChartBuilder::on(area)
            .margin_top(40)
            .margin_bottom(50)
            .margin_left(60)
            .margin_right(20)
            .build_cartesian_2d(1.0_f32..epochs, y_low..y_high)?;
        let x_ticks: Vec<f32> = (1..=epochs as usize)
            .filter(|e| *e == 1 || e % 5 == 0)
            .map(|e| e as f32)
            .collect();
        let y_ticks: Vec<f32> = (0..=5)
            .map(|i| y_low + (y_high - y_low) * i as f32 / 5.0)
            .collect();
        for &x in &x_ticks {
            chart.draw_series(LineSeries::new([(x, y_low), (x, y_high)], GRID))?;
            let (px, py) = chart.backend_coord(&(x, y_low));
            text(root, &format!("{x}"), px, py + 8, BLACK, true)?;
        }
        for &y in &y_ticks {
            chart.draw_series(LineSeries::new([(1.0, y), (epochs, y)], GRID))?;
            let (px, py) = chart.backend_coord(&(1.0, y));
            let label = format!("{y:.2}");
            text(
                root,
                &label,
                px - 8 - text_width(&label),
                py - 7,
                BLACK,
                false,
            )?;
        }
        chart.plotting_area().draw(&Rectangle::new(
            [(1.0, y_low), (epochs, y_high)],
            BLACK.stroke_width(1),
        ))?;
        for curve in curves {
            let style = curve.color.stroke_width(2);
            chart.draw_series(LineSeries::new(curve.points.iter().copied(), style))?;
        }
        // The title above the chart, "epoch" under the x axis, the legend at
        // the top right.
        let (left, top) = chart.backend_coord(&(1.0, y_high));
        let (right, bottom) = chart.backend_coord(&(epochs, y_low));
        let centre = (left + right) / 2;
        text(
            root,
            title,
            centre - text_width(title) / 2,
            top - 28,
            BLACK,
            false,
        )?;
        text(
            root,
            "epoch",
            centre - text_width("epoch") / 2,
            bottom + 30,
            BLACK,
            false,
        )?;
        for (i, curve) in curves.iter().enumerate() {
            let y = top + 12 + 20 * i as i32;
            let x = right - 110;
            root.draw(&PathElement::new(
                [(x, y + 7), (x + 24, y + 7)],
                curve.color.stroke_width(3),
            ))?;
            text(root, curve.name, x + 32, y, curve.color, false)?;
        }
        Ok(())
    }

    /// The smallest of 1, 2 or 5 times a power of ten at or above `v`.
    fn nice_ceil(v: f32) -> f32 {
        if v <= 0.0 {
            return 1.0;
        }
        let power = 10_f32.powf(v.log10().floor());
        [1.0, 2.0, 2.5, 5.0, 10.0]
            .into_iter()
            .map(|m| m * power)
            .find(|&n| n >= v)
            .unwrap_or(10.0 * power)
    }

    /// Pixels per font cell.
    const SCALE: i32 = 3;

    /// 3x5 glyphs, one row of three bits per entry (bit 2 is the left
    /// column).
    fn glyph(c: char) -> [u8; 5] {
        match c {
            '0' => [7, 5, 5, 5, 7],
            '1' => [2, 6, 2, 2, 7],
            '2' => [7, 1, 7, 4, 7],
            '3' => [7, 1, 7, 1, 7],
            '4' => [5, 5, 7, 1, 1],
            '5' => [7, 4, 7, 1, 7],
            '6' => [7, 4, 7, 5, 7],
            '7' => [7, 1, 1, 1, 1],
            '8' => [7, 5, 7, 5, 7],
            '9' => [7, 5, 7, 1, 7],
            '.' => [0, 0, 0, 0, 2],
            '-' => [0, 0, 7, 0, 0],
            'a' => [0, 3, 5, 5, 3],
            'c' => [0, 3, 4, 4, 3],
            'e' => [0, 2, 7, 4, 3],
            'h' => [4, 4, 6, 5, 5],
            'i' => [2, 0, 2, 2, 2],
            'l' => [6, 2, 2, 2, 7],
            'n' => [0, 6, 5, 5, 5],
            'o' => [0, 2, 5, 5, 2],
            'p' => [0, 6, 5, 6, 4],
            'r' => [0, 5, 6, 4, 4],
            's' => [0, 3, 6, 3, 6],
            't' => [2, 7, 2, 2, 3],
            'u' => [0, 5, 5, 5, 3],
            'v' => [0, 5, 5, 5, 2],
            'y' => [0, 5, 3, 1, 6],
            _ => [0; 5],
        }
    }

    fn text_width(s: &str) -> i32 {
        s.chars().count() as i32 * 4 * SCALE - SCALE
    }

    /// Draws `s` with its top-left corner at `(x, y)` (centred on `x` if
    /// `centred`).
    fn text(
        root: &Area<'_>,
        s: &str,
        x: i32,
        y: i32,
        color: RGBColor,
        centred: bool,
    ) -> PlotResult {
        let x = if centred { x - text_width(s) / 2 } else { x };
        for (i, c) in s.chars().enumerate() {
            let left = x + i as i32 * 4 * SCALE;
            for (row, bits) in glyph(c).into_iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        let (px, py) = (left + col * SCALE, y + row as i32 * SCALE);
                        root.draw(&Rectangle::new(
                            [(px, py), (px + SCALE, py + SCALE)],
                            color.filled(),
                        ))?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::{CommandFactory, Parser};

    use super::Args;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn no_flag_plots_and_no_plot_skips_the_plot() {
        assert!(!Args::try_parse_from(["train_digits"]).unwrap().no_plot);
        assert!(
            Args::try_parse_from(["train_digits", "--no-plot"])
                .unwrap()
                .no_plot
        );
    }

    #[test]
    fn help_is_a_usage_message_not_a_run() {
        let err = Args::try_parse_from(["train_digits", "--help"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DisplayHelp);
        let help = err.to_string();
        assert!(help.contains("Usage: train_digits [OPTIONS]"), "{help}");
        assert!(help.contains("--no-plot"), "{help}");
    }

    #[test]
    fn unknown_flags_and_arguments_are_rejected() {
        for args in [
            &["train_digits", "--noplot"][..],
            &["train_digits", "--epochs", "3"],
            &["train_digits", "extra"],
        ] {
            let err = Args::try_parse_from(args).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::UnknownArgument, "{args:?}");
        }
    }
}
