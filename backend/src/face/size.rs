//! Byte sizes on the command line (`--size 10G`, `--rate 64M`).

use std::str::FromStr;

use dovetail_layout::SECTOR_SIZE;

/// A byte size: a byte count, or a whole number with a suffix K, KiB, M, MiB, G, GiB, T or
/// TiB (any case; powers of 1024: 1G = 1GiB = 1073741824). KB, MB, GB and TB are refused as
/// ambiguous (powers of 1000 or 1024?).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, suffix) = (&t[..split], t[split..].trim_start());
        let not_a_size = || format!("{s:?} is not a size (e.g. 512M, 1G, 1GiB, 1073741824)");
        if digits.is_empty() || !suffix.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(not_a_size());
        }
        let shift = match suffix.to_ascii_lowercase().as_str() {
            "" => 0,
            "k" | "kib" => 10,
            "m" | "mib" => 20,
            "g" | "gib" => 30,
            "t" | "tib" => 40,
            "kb" | "mb" | "gb" | "tb" => {
                let unit = &suffix[..1];
                return Err(format!(
                    "size {s:?} is ambiguous ({suffix} may mean a power of 1000 or of 1024): \
                     write {digits}{unit} or {digits}{unit}iB (powers of 1024), or the byte count"
                ));
            }
            _ => {
                return Err(format!(
                    "unknown size suffix {suffix:?} in {s:?} (use K, KiB, M, MiB, G, GiB, T or \
                     TiB: powers of 1024)"
                ))
            }
        };
        let n: u64 = digits.parse().map_err(|_| not_a_size())?;
        let bytes = n
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("size {s:?} is too large"))?;
        if bytes == 0 {
            return Err("size must be greater than zero".into());
        }
        if bytes % SECTOR_SIZE != 0 {
            return Err(format!(
                "size {s:?} is not a whole number of 512-byte sectors"
            ));
        }
        Ok(Size(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!("1G".parse::<Size>(), Ok(Size(1 << 30)));
        assert_eq!("512M".parse::<Size>(), Ok(Size(512 << 20)));
        assert_eq!("4k".parse::<Size>(), Ok(Size(4096)));
        assert_eq!("1048576".parse::<Size>(), Ok(Size(1 << 20)));
        assert_eq!("2T".parse::<Size>(), Ok(Size(2 << 40)));
        assert!("0".parse::<Size>().is_err());
        assert!("100".parse::<Size>().is_err(), "not a whole sector");
        assert!("1X".parse::<Size>().is_err());
        assert!("G".parse::<Size>().is_err());
        assert!("99999999999T".parse::<Size>().is_err(), "overflow");
    }

    #[test]
    fn sizes_take_iec_suffixes_and_refuse_ambiguous_ones() {
        for (text, bytes) in [
            ("1GiB", 1u64 << 30),
            ("1gib", 1 << 30),
            ("1 GiB", 1 << 30),
            ("64KiB", 64 << 10),
            ("512MiB", 512 << 20),
            ("2TiB", 2 << 40),
            ("8191T", 8191 << 40),
        ] {
            assert_eq!(text.parse::<Size>(), Ok(Size(bytes)), "{text}");
        }
        for text in ["1GB", "1gb", "512MB", "4KB", "1kB", "2TB"] {
            let e = text.parse::<Size>().expect_err(text);
            assert!(e.contains("is ambiguous"), "{text}: {e}");
        }
        let e = "1GB".parse::<Size>().expect_err("GB");
        assert!(e.contains("write 1G or 1GiB"), "{e}");
        for text in ["1B", "1PiB", "1Gi", "1.5G", "-1G", "G", "1G1"] {
            assert!(text.parse::<Size>().is_err(), "{text}");
        }
        let e = "1X".parse::<Size>().expect_err("X");
        assert!(e.contains("use K, KiB, M, MiB, G, GiB, T or TiB"), "{e}");
        for text in ["1.5G", "G", "-1G", "1G1", ""] {
            let e = text.parse::<Size>().expect_err(text);
            assert!(e.contains("is not a size"), "{text}: {e}");
        }
    }
}
