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
    let root = SVGBackend::new(&output, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency vs offered load (0 ms backend, 2 cores, loopback)",
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_rate * 1.05, (0.05f64..max_ms * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("offered load (requests/s, open loop)")
        .y_desc("latency (ms, log scale)")
        .draw()?;
    let colors = [RED, BLUE, GREEN, MAGENTA, BLACK];
    for (i, (target, points)) in series.iter_mut().enumerate() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.2)),
                color.stroke_width(2),
            ))?
            .label(format!("{target} p99"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(1),
            ))?
            .label(format!("{target} p50"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
            });
        chart.draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.0, p.2), 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    println!("wrote {output}");
    Ok(())
}
