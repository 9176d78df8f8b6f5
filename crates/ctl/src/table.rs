//! Aligned text tables (like `tabwriter` with three spaces of padding) and the formatting of values in
//! them.

use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Self {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn write(&self, w: &mut impl Write) -> io::Result<()> {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut s = String::new();
            for (i, cell) in cells.iter().enumerate().take(cols) {
                s.push_str(cell);
                if i + 1 < cols {
                    let pad = widths[i] - cell.chars().count() + 3;
                    s.extend(std::iter::repeat_n(' ', pad));
                }
            }
            s.truncate(s.trim_end().len());
            s
        };
        writeln!(w, "{}", line(self.header.clone()))?;
        for row in &self.rows {
            writeln!(w, "{}", line(row.iter().map(String::as_str).collect()))?;
        }
        Ok(())
    }
}

/// "3 seconds ago", "5 minutes ago"... for a CRI timestamp in nanoseconds since the epoch.
pub fn ago(nanos: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or_default();
    ago_at(nanos, now)
}

fn ago_at(nanos: i64, now_nanos: i128) -> String {
    if nanos <= 0 {
        return "unknown".into();
    }
    let secs = ((now_nanos - i128::from(nanos)) / 1_000_000_000).max(0);
    let (n, unit) = match secs {
        0..=59 => (secs, "second"),
        60..=3599 => (secs / 60, "minute"),
        3600..=86_399 => (secs / 3600, "hour"),
        _ => (secs / 86_400, "day"),
    };
    if n == 1 {
        format!("1 {unit} ago")
    } else {
        format!("{n} {unit}s ago")
    }
}

/// Decimal sizes, as crictl and docker print them: 2.05MB.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        return format!("{bytes}B");
    }
    let digits = format!("{v:.3}");
    let digits = digits.trim_end_matches('0').trim_end_matches('.');
    format!("{digits}{}", UNITS[i])
}

/// Splits `registry/repo:tag` into repository and tag; a `:` inside the registry host is not a tag.
pub fn split_tag(reference: &str) -> (&str, &str) {
    let slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[slash..].rfind(':') {
        Some(i) => (&reference[..slash + i], &reference[slash + i + 1..]),
        None => (reference, "<none>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned() {
        let mut t = Table::new(&["ID", "NAME", "STATE"]);
        t.row(vec!["a".into(), "long-name".into(), "Ready".into()]);
        t.row(vec!["bbbb".into(), "x".into(), "".into()]);
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID     NAME        STATE\na      long-name   Ready\nbbbb   x\n"
        );
    }

    #[test]
    fn ages() {
        let now = 10_000_i128 * 1_000_000_000;
        let at = |s: i64| ago_at((10_000 - s) * 1_000_000_000, now);
        assert_eq!(at(0), "0 seconds ago");
        assert_eq!(at(1), "1 second ago");
        assert_eq!(at(120), "2 minutes ago");
        assert_eq!(at(3600), "1 hour ago");
        assert_eq!(at(9000), "2 hours ago");
        assert_eq!(ago_at(0, now), "unknown");
        assert_eq!(ago_at(i64::MAX, now), "0 seconds ago");
    }

    #[test]
    fn sizes() {
        assert_eq!(size(999), "999B");
        assert_eq!(size(2_048_000), "2.048MB");
        assert_eq!(size(2_000_000), "2MB");
        assert_eq!(size(1_500), "1.5kB");
    }

    #[test]
    fn tags() {
        assert_eq!(
            split_tag("docker.io/library/busybox:latest"),
            ("docker.io/library/busybox", "latest")
        );
        assert_eq!(
            split_tag("localhost:5000/x"),
            ("localhost:5000/x", "<none>")
        );
        assert_eq!(split_tag("localhost:5000/x:1"), ("localhost:5000/x", "1"));
    }
}
