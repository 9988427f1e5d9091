//! Draws latency against offered load from the results of `benches/e2e.sh`.
//!
//! `cargo run --release --example plot_latency -- target/bench/e2e.json docs/latency-vs-load.svg`

use std::collections::BTreeMap;

use plotters::prelude::*;
use serde_json::Value;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (input, output) = match (args.get(1), args.get(2)) {
        (Some(i), Some(o)) => (i.clone(), o.clone()),
        _ => return Err("usage: plot_latency RESULTS.json OUT.svg".into()),
    };
    let results: Value = serde_json::from_str(&std::fs::read_to_string(&input)?)?;
    let mut series: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for row in results["latency"].as_array().ok_or("no latency rows")? {
        let target = row["target"].as_str().unwrap_or("?").to_string();
        let rate = row["offered_rps"].as_f64().unwrap_or(0.0);
        let p50 = row["p50_ms"].as_f64().unwrap_or(0.0);
        let p99 = row["p99_ms"].as_f64().unwrap_or(0.0);
        series.entry(target).or_default().push((rate, p50, p99));
    }
    let max_rate = series.values().flatten().map(|r| r.0).fold(1.0, f64::max);
    let max_ms = series.values().flatten().map(|r| r.2).fold(1.0, f64::max);
    let min_ms = series
        .values()
        .flatten()
        .map(|r| r.1)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.01, 1.0);
    let root = SVGBackend::new(&output, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency vs offered load (0 ms backend, 2 cores, loopback)",
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(70)
        .build_cartesian_2d(
            0.0..max_rate * 1.05,
            (min_ms * 0.5..max_ms * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("offered load (requests/s, open loop)")
        .y_desc("latency (ms, log scale)")
        .x_labels(10)
        .y_labels(12)
        .x_label_formatter(&|x| format!("{:.0}", x))
        .y_label_formatter(&|y| {
            if *y >= 10.0 {
                format!("{y:.0}")
            } else if *y >= 1.0 {
                format!("{y:.1}")
            } else {
                format!("{y:.2}")
            }
        })
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    // Paul Tol's "bright" scheme: distinguishable, also in colour-blind
    // vision. A target keeps its colour whatever else was measured.
    let colour_of = |target: &str| match target {
        "tollgate" => RGBColor(0xEE, 0x66, 0x77),
        "nginx" => RGBColor(0x44, 0x77, 0xAA),
        "haproxy" => RGBColor(0x22, 0x88, 0x33),
        "simulator" => RGBColor(0x66, 0x66, 0x66),
        _ => RGBColor(0xAA, 0x33, 0x77),
    };
    for (target, points) in series.iter_mut() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = colour_of(target);
        let name = if target == "simulator" {
            "backend straight"
        } else {
            target.as_str()
        };
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.2)),
                color.stroke_width(3),
            ))?
            .label(format!("{name} p99"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        chart.draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.0, p.2), 4, color.filled())),
        )?;
        chart
            .draw_series(DashedLineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                6,
                4,
                color.stroke_width(2),
            ))?
            .label(format!("{name} p50 (dashed)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 10, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .iter()
                .map(|p| TriangleMarker::new((p.0, p.1), 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    println!("wrote {output}");
    Ok(())
}
