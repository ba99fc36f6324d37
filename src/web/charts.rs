//! The console's charts: daily usage over 90 days as SVG, drawn on the
//! server with plotters (its SVG backend needs no fonts, no script and no
//! client-side library; the page shows it as an image, which the CSP allows).

use crate::config::units::format_size;
use crate::state::console::UsagePoint;
use plotters::prelude::*;
use std::collections::BTreeMap;

/// Width and height of a chart, in pixels.
pub const SIZE: (u32, u32) = (720, 240);

/// One value per day from `start` (`YYYY-MM-DD`) for `days` days: the sum
/// of that day's snapshots, carried forward over days without one (usage
/// does not drop to 0 because the daemon was down); None before the first.
pub fn daily(points: &[UsagePoint], start: String, days: i64) -> Vec<(String, Option<u64>)> {
    let mut by_day: BTreeMap<&str, u64> = BTreeMap::new();
    for p in points {
        *by_day.entry(p.day.as_str()).or_default() += p.used.max(0) as u64;
    }
    let Ok(first) = start.parse::<jiff::civil::Date>() else {
        return Vec::new();
    };
    let mut last = None;
    (0..days)
        .filter_map(|i| first.checked_add(jiff::Span::new().days(i)).ok())
        .map(|d| {
            let key = d.to_string();
            if let Some(v) = by_day.get(key.as_str()) {
                last = Some(*v);
            }
            (key, last)
        })
        .collect()
}

/// The chart of `series`, with `allotted` drawn as a line when set.
pub fn usage_svg(title: &str, series: &[(String, Option<u64>)], allotted: Option<u64>) -> String {
    let mut out = String::new();
    // plotters reports only backend errors, which a String cannot raise;
    // an Err leaves a partial chart rather than a failed page.
    let _ = draw(&mut out, title, series, allotted);
    out
}

fn draw<'o>(
    out: &'o mut String,
    title: &str,
    series: &[(String, Option<u64>)],
    allotted: Option<u64>,
) -> Result<(), Box<dyn std::error::Error + 'o>> {
    let root = SVGBackend::with_string(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let data_top = series.iter().filter_map(|(_, v)| *v).max().unwrap_or(0);
    // The allotment sets the scale only when the data would still show
    // (a few MiB against a TiB allotment would be a flat line); otherwise
    // the caption names it.
    let allotted_shown = allotted.filter(|&a| a <= data_top.saturating_mul(4));
    let top = data_top
        .saturating_add(data_top / 4)
        .max(allotted_shown.unwrap_or(0))
        .max(1024);
    let title = match allotted {
        Some(a) if allotted_shown.is_none() => {
            format!("{title} (allotted {}, off the scale)", format_size(a))
        }
        _ => title.to_string(),
    };
    let title = title.as_str();
    let n = series.len().max(2) as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(72)
        .build_cartesian_2d(0..n - 1, 0f64..top as f64 * 1.08)?;
    let labels: Vec<String> = series.iter().map(|(d, _)| d.clone()).collect();
    chart
        .configure_mesh()
        .x_labels(6)
        .y_labels(5)
        .x_label_formatter(&|i| {
            labels
                .get(*i as usize)
                .map(|d| d.get(5..).unwrap_or(d).to_string())
                .unwrap_or_default()
        })
        .y_label_formatter(&|v| format_size(*v as u64))
        .draw()?;
    let color = RGBColor(11, 92, 173);
    // One area per run of days with data, so gaps stay gaps.
    let mut run: Vec<(i32, f64)> = Vec::new();
    let mut runs = Vec::new();
    for (i, (_, v)) in series.iter().enumerate() {
        match v {
            Some(v) => run.push((i as i32, *v as f64)),
            None if !run.is_empty() => runs.push(std::mem::take(&mut run)),
            None => {}
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    for r in runs {
        // A dot per day, so a single day shows too.
        chart.draw_series(r.iter().map(|&p| Circle::new(p, 2, color.filled())))?;
        chart.draw_series(
            AreaSeries::new(r, 0.0, color.mix(0.25)).border_style(color.stroke_width(2)),
        )?;
    }
    if let Some(a) = allotted_shown {
        chart
            .draw_series(LineSeries::new(
                [(0, a as f64), (n - 1, a as f64)],
                RGBColor(179, 38, 30).stroke_width(1),
            ))?
            .label(format!("allotted {}", format_size(a)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK.mix(0.2))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(day: &str, customer: &str, used: i64) -> UsagePoint {
        UsagePoint {
            day: day.into(),
            customer: customer.into(),
            used,
        }
    }

    #[test]
    fn days_sum_customers_and_carry_forward() {
        let pts = [
            point("2026-11-02", "a", 10),
            point("2026-11-02", "b", 5),
            point("2026-11-04", "a", 30),
        ];
        let s = daily(&pts, "2026-11-01".into(), 5);
        let v: Vec<Option<u64>> = s.iter().map(|(_, v)| *v).collect();
        assert_eq!(v, [None, Some(15), Some(15), Some(30), Some(30)]);
        assert_eq!(s[0].0, "2026-11-01");
        assert_eq!(s[4].0, "2026-11-05");
    }

    #[test]
    fn the_svg_parses_and_draws_the_data() {
        let pts = [
            point("2026-11-02", "a", 5 << 20),
            point("2026-11-03", "a", 7 << 20),
        ];
        let s = daily(&pts, "2026-11-01".into(), 90);
        let svg = usage_svg("Storage used by <Contoso & Co>", &s, Some(10 << 20));
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        let text: String = doc
            .descendants()
            .filter(|n| n.is_text())
            .filter_map(|n| n.text())
            .collect();
        assert!(text.contains("Storage used by <Contoso & Co>"), "{text}");
        assert!(
            text.contains("allotted 10.0 MiB") || text.contains("allotted 10 MiB"),
            "{text}"
        );
        // The area and the allotment line.
        assert!(
            doc.descendants()
                .any(|n| n.has_tag_name("polygon") || n.has_tag_name("path"))
        );
        assert!(doc.descendants().any(|n| n.has_tag_name("polyline")));
        let empty = usage_svg("nothing yet", &daily(&[], "2026-11-01".into(), 90), None);
        roxmltree::Document::parse(&empty).expect("an empty chart is well-formed too");
        // An allotment far above the data is named, not drawn.
        let far = usage_svg("far", &s, Some(1 << 40));
        assert!(far.contains("(allotted 1 TiB, off the scale)"), "{far}");
        assert!(svg.contains("#B3261E"), "the allotment line");
        assert!(!far.contains("#B3261E"), "no allotment line");
    }
}
