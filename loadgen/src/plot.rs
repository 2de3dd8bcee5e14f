//! loadgen's one plotter: self-contained SVG, no dependency. `Frame` draws what every plot
//! has (canvas, title, grid with labels, axis titles, legend, border); the plots draw their
//! curves into it.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::report::RssSample;

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Canvas size and the margins around the plot area, in SVG units.
struct Layout {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
}

/// An SVG being written, with its plot area.
struct Frame {
    l: Layout,
    svg: String,
}

impl Frame {
    fn new(l: Layout, title: &str) -> Frame {
        let (w, h) = (l.w, l.h);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let mut f = Frame { l, svg };
        let _ = writeln!(
            f.svg,
            r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            f.mid_x(),
            xml_escape(title)
        );
        f
    }

    /// x of a fraction (0 left, 1 right) of the plot area's width.
    fn px(&self, frac: f64) -> f64 {
        self.l.left + frac * (self.l.w - self.l.left - self.l.right)
    }

    /// y of a fraction (0 bottom, 1 top) of the plot area's height.
    fn py(&self, frac: f64) -> f64 {
        self.l.h - self.l.bottom - frac * (self.l.h - self.l.top - self.l.bottom)
    }

    fn mid_x(&self) -> f64 {
        (self.px(0.0) + self.px(1.0)) / 2.0
    }

    /// A vertical grid line at `frac` of the width, labelled under the axis.
    fn x_grid(&mut self, frac: f64, label: &str) {
        let (x, top, base) = (self.px(frac), self.py(1.0), self.py(0.0));
        let _ = writeln!(
            self.svg,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{base}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            base + 18.0
        );
    }

    /// A horizontal grid line at `frac` of the height, labelled left of the axis.
    fn y_grid(&mut self, frac: f64, label: &str) {
        let (y, left, right) = (self.py(frac), self.px(0.0), self.px(1.0));
        let _ = writeln!(
            self.svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            left - 6.0,
            y + 4.0
        );
    }

    /// Axis titles and the plot area's border.
    fn axes(&mut self, x_title: &str, y_title: &str) {
        let mid_y = (self.py(0.0) + self.py(1.0)) / 2.0;
        let _ = writeln!(
            self.svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{x_title}</text>"#,
            self.mid_x(),
            self.l.h - 15.0
        );
        let _ = writeln!(
            self.svg,
            r#"<text x="18" y="{mid_y:.1}" text-anchor="middle" transform="rotate(-90 18 {mid_y:.1})">{y_title}</text>"#
        );
        let _ = writeln!(
            self.svg,
            r#"<rect x="{}" y="{}" width="{:.1}" height="{:.1}" fill="none" stroke="black"/>"#,
            self.px(0.0),
            self.py(1.0),
            self.px(1.0) - self.px(0.0),
            self.py(0.0) - self.py(1.0)
        );
    }

    /// Legend entry `i`, right of the plot area.
    fn legend(&mut self, i: usize, name: &str, color: &str) {
        let x = self.px(1.0);
        let y = self.py(1.0) + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            self.svg,
            r#"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{color}" stroke-width="2"/><text x="{}" y="{:.1}">{}</text>"#,
            x + 10.0,
            x + 30.0,
            x + 36.0,
            y + 4.0,
            xml_escape(name)
        );
    }

    /// A curve through points given as fractions of the plot area.
    fn curve(&mut self, points: impl IntoIterator<Item = (f64, f64)>, color: &str) {
        let mut pts = String::new();
        for (x, y) in points {
            let _ = write!(pts, "{:.1},{:.1} ", self.px(x), self.py(y.min(1.0)));
        }
        let _ = writeln!(
            self.svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.trim_end()
        );
    }

    fn finish(mut self) -> String {
        self.svg.push_str("</svg>\n");
        self.svg
    }
}

/// Latency by percentile in the usual HdrHistogram style: x is 1/(1-q) on a log scale, so the
/// tail gets as much room as the median. One curve per step.
pub fn latency_percentiles(curves: &[(String, Histogram<u64>)]) -> String {
    let samples = curves.iter().map(|(_, h)| h.len()).max().unwrap_or(0);
    // No point plotting beyond the resolution the sample count supports.
    let decades = ((samples.max(1) as f64).log10().ceil()).clamp(2.0, 6.0);
    let max_us = curves.iter().map(|(_, h)| h.max()).max().unwrap_or(0);
    let y_max_ms = nice_ceiling(max_us.max(1) as f64 / 1000.0 * 1.05);
    let layout = Layout {
        w: 860.0,
        h: 500.0,
        left: 70.0,
        right: 180.0,
        top: 40.0,
        bottom: 60.0,
    };
    let mut f = Frame::new(layout, "loadgen delivery latency by percentile");
    for d in 0..=decades as u32 {
        let label = match d {
            0 => "0%".to_string(),
            1 => "90%".to_string(),
            2 => "99%".to_string(),
            _ => format!("99.{}%", "9".repeat(d as usize - 2)),
        };
        f.x_grid(f64::from(d) / decades, &label);
    }
    for i in 0..=5 {
        let frac = f64::from(i) / 5.0;
        f.y_grid(frac, &trim_float(y_max_ms * frac));
    }
    f.axes("percentile", "latency (ms)");
    for (i, (name, h)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        f.legend(i, name, color);
        if h.is_empty() {
            continue;
        }
        let points = h.iter_quantiles(5).map(|v| {
            let q = v.quantile_iterated_to();
            let x = if q >= 1.0 {
                decades
            } else {
                (1.0 / (1.0 - q)).log10().min(decades)
            };
            let ms = h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0;
            (x / decades, ms / y_max_ms)
        });
        f.curve(points.collect::<Vec<_>>(), color);
    }
    f.finish()
}

/// The servers' RSS over the run; the measured window (`window`, seconds since the start)
/// is split into thirds, which is how a soak judges whether memory stopped growing, and the
/// time before it (connect, readiness, `warmup_s` of warm-up) is shaded.
pub fn rss_over_time(samples: &[RssSample], window: (f64, f64), warmup_s: f64) -> String {
    let t_end = samples.iter().map(|s| s.t_s).fold(window.1, f64::max);
    let x_step = tick_step(t_end.max(1.0));
    let x_max = (t_end.max(1.0) / x_step).ceil() * x_step;
    let peak_mib = samples.iter().map(|s| mib(s.rss_kb)).fold(1.0, f64::max);
    let y_max = nice_ceiling(peak_mib * 1.1);
    let layout = Layout {
        w: 900.0,
        h: 480.0,
        left: 70.0,
        right: 40.0,
        top: 46.0,
        bottom: 56.0,
    };
    let mut f = Frame::new(layout, "server RSS over the run");
    let fx = |t: f64| t / x_max;
    f.shade_before(fx(window.0), "connect + warm-up");
    if warmup_s > 0.0 {
        f.marker(fx((window.0 - warmup_s).max(0.0)), None);
    }
    let third = (window.1 - window.0) / 3.0;
    for (k, name) in ["first third", "middle third", "last third"]
        .iter()
        .enumerate()
    {
        let a = window.0 + k as f64 * third;
        f.marker(fx(a), Some((fx(a + third / 2.0), name)));
    }
    f.marker(fx(window.1), None);
    for i in 0..=(x_max / x_step).round() as u32 {
        let t = f64::from(i) * x_step;
        f.x_grid(fx(t), &format!("{t:.0}"));
    }
    for i in 0..=5 {
        let frac = f64::from(i) / 5.0;
        f.y_grid(frac, &trim_float(y_max * frac));
    }
    f.axes("seconds since loadgen started", "server RSS (MiB)");
    let points: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (fx(s.t_s), mib(s.rss_kb) / y_max))
        .collect();
    f.curve(points.iter().copied(), COLORS[0]);
    f.dots(&points, COLORS[0]);
    f.finish()
}

impl Frame {
    /// Shades the plot area left of `frac`, with a label at the top.
    fn shade_before(&mut self, frac: f64, label: &str) {
        let (x0, x1, top, base) = (self.px(0.0), self.px(frac), self.py(1.0), self.py(0.0));
        let _ = writeln!(
            self.svg,
            r##"<rect x="{x0:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="#f0f0f0"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#777">{label}</text>"##,
            x1 - x0,
            base - top,
            (x0 + x1) / 2.0,
            top + 14.0
        );
    }

    /// A dashed vertical line at `frac`, with an optional label at the top of another x.
    fn marker(&mut self, frac: f64, label: Option<(f64, &str)>) {
        let (x, top, base) = (self.px(frac), self.py(1.0), self.py(0.0));
        let _ = writeln!(
            self.svg,
            r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{base:.1}" stroke="#999" stroke-dasharray="4,3"/>"##
        );
        if let Some((at, text)) = label {
            let _ = writeln!(
                self.svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#777">{text}</text>"##,
                self.px(at),
                top + 14.0
            );
        }
    }

    /// A dot on every point (samples are sparse, so each one shows).
    fn dots(&mut self, points: &[(f64, f64)], color: &str) {
        for &(x, y) in points {
            let _ = writeln!(
                self.svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"#,
                self.px(x),
                self.py(y)
            );
        }
    }
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

/// A 1, 2 or 5 times a power of ten step that gives at most 12 ticks over `span`.
fn tick_step(span: f64) -> f64 {
    let mag = if span > 12.0 {
        10f64.powf((span / 12.0).log10().floor())
    } else {
        1.0
    };
    [1.0, 2.0, 5.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|step| span / step <= 12.0)
        .unwrap_or(10.0 * mag)
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn well_formed(svg: &str) {
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn latency_plot_has_a_curve_per_step() {
        let mut h = crate::client::new_hist();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let svg = latency_percentiles(&[("5/s".into(), h.clone()), ("10/s".into(), h)]);
        well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("99.99%"));
    }

    #[test]
    fn rss_plot_marks_the_window() {
        let samples: Vec<RssSample> = (0..=12u32)
            .map(|i| RssSample {
                t_s: f64::from(i) * 10.0,
                rss_kb: 10_240 + u64::from(i) * 1024,
            })
            .collect();
        let svg = rss_over_time(&samples, (30.0, 120.0), 10.0);
        well_formed(&svg);
        assert_eq!(svg.matches("<circle").count(), samples.len());
        assert!(svg.contains("middle third") && svg.contains("connect + warm-up"));
        // Nothing sampled (the servers were gone): still a valid, empty plot.
        well_formed(&rss_over_time(&[], (3.0, 13.0), 2.0));
    }

    #[test]
    fn nice_numbers() {
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(42.0), 50.0);
        assert_eq!(tick_step(10.0), 1.0);
        assert_eq!(tick_step(100.0), 10.0);
        assert_eq!(tick_step(640.0), 100.0);
        assert_eq!(trim_float(2.5), "2.5");
        assert_eq!(trim_float(10.0), "10");
    }
}
