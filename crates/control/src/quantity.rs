//! Parsing the resource quantities the SDK sends (`cpu: "2" | "0.5" | "500m"`, `memory: "4Gi" | "512Mi" | "1G"`).

use crate::ControlError;

/// CPU in thousandths of a core, from cores (`"2"`, `"0.5"`) or millicores (`"500m"`).
pub fn parse_cpu(field: &str, text: &str) -> Result<u64, ControlError> {
    let t = text.trim();
    let bad = || {
        ControlError::InvalidArgument(format!(
            "{field} {text:?} is not a CPU quantity: use cores (\"2\", \"0.5\") or millicores (\"500m\"), at least 10m"
        ))
    };
    let millis = if let Some(m) = t.strip_suffix('m') {
        m.parse::<u64>().map_err(|_| bad())?
    } else {
        let cores: f64 = t.parse().map_err(|_| bad())?;
        if !cores.is_finite() || cores < 0.0 {
            return Err(bad());
        }
        (cores * 1000.0).round() as u64
    };
    if !(10..=1_000_000).contains(&millis) {
        return Err(bad());
    }
    Ok(millis)
}

/// Bytes, from a Kubernetes-style quantity: plain bytes, binary (`Ki`, `Mi`, `Gi`, `Ti`) or decimal (`k`, `K`,
/// `M`, `G`, `T`) suffixes, optionally fractional (`"1.5Gi"`).
pub fn parse_memory(field: &str, text: &str) -> Result<u64, ControlError> {
    let t = text.trim();
    let bad = || {
        ControlError::InvalidArgument(format!(
            "{field} {text:?} is not a memory quantity: use bytes with a unit, e.g. \"512Mi\", \"4Gi\", \"1G\" \
             (units Ki, Mi, Gi, Ti, k, M, G, T), at least 16Mi"
        ))
    };
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        _ => return Err(bad()),
    };
    let bytes = n * mult;
    if !bytes.is_finite() || !(16.0 * 1024.0 * 1024.0..=1e15).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Bytes as a person reads them: `1.5 GiB`, `512 MiB`, `900 B`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_in_their_largest_whole_unit() {
        assert_eq!(format_bytes(900), "900 B");
        assert_eq!(format_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(format_bytes(1 << 40), "1.0 TiB");
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu("cpu", "2").unwrap(), 2000);
        assert_eq!(parse_cpu("cpu", "0.5").unwrap(), 500);
        assert_eq!(parse_cpu("cpu", "500m").unwrap(), 500);
        assert_eq!(parse_cpu("cpu", " 1.25 ").unwrap(), 1250);
        for bad in ["", "abc", "-1", "0", "5m", "2 cores", "1e9", "NaN", "m"] {
            let e = parse_cpu("resources.cpu", bad).unwrap_err().to_string();
            assert!(e.contains("resources.cpu") && e.contains("millicores"), "{bad}: {e}");
        }
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("m", "4Gi").unwrap(), 4 << 30);
        assert_eq!(parse_memory("m", "512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_memory("m", "1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_memory("m", "1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_memory("m", "67108864").unwrap(), 64 << 20);
        for bad in ["", "4GB", "4gi", "lots", "1Mi", "-1Gi", "Gi"] {
            let e = parse_memory("resources.memory", bad).unwrap_err().to_string();
            assert!(e.contains("resources.memory") && e.contains("512Mi"), "{bad}: {e}");
        }
    }
}
