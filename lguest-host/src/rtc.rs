//! The MC146818 CMOS clock at ports 0x70/0x71, read-only time from the host's clock (UTC, BCD,
//! 24-hour), so the guest kernel's wall clock starts where the host's is.

/// Index port.
pub const INDEX: u16 = 0x70;
/// Data port.
pub const DATA: u16 = 0x71;

/// The CMOS: an index and 128 bytes of RAM; the time registers come from the host clock.
#[derive(Debug)]
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
}

impl Default for Rtc {
    fn default() -> Self {
        Rtc {
            index: 0,
            ram: [0; 128],
        }
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Rtc {
    /// A write to `port`.
    pub fn write(&mut self, port: u16, v: u8) {
        match port {
            INDEX => self.index = v & 0x7f,
            _ => self.ram[usize::from(self.index)] = v,
        }
    }

    /// A read of `port` at `unix_secs`.
    pub fn read(&self, port: u16, unix_secs: u64) -> u8 {
        if port == INDEX {
            return self.index;
        }
        let days = (unix_secs / 86_400) as i64;
        let secs = unix_secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        match self.index {
            0x00 => bcd(secs % 60),
            0x02 => bcd(secs / 60 % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u64), // 1970-01-01 was a Thursday
            0x07 => bcd(d),
            0x08 => bcd(m),
            0x09 => bcd(y as u64 % 100),
            0x32 => bcd(y as u64 / 100),
            0x0a => 0x26, // no update in progress, 32.768 kHz divider
            0x0b => 0x02, // 24-hour, BCD, no interrupts
            0x0c => 0,
            0x0d => 0x80, // valid
            i => self.ram[usize::from(i)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_date_in_bcd() {
        let mut r = Rtc::default();
        // 2026-11-27 15:40:40 UTC
        let t = 1_795_794_040;
        let mut get = |i: u8| {
            r.write(INDEX, i);
            r.read(DATA, t)
        };
        assert_eq!(
            [get(0x32), get(9), get(8), get(7), get(4), get(2), get(0)],
            [0x20, 0x26, 0x11, 0x27, 0x15, 0x40, 0x40]
        );
        assert_eq!(get(0x0b) & 0x04, 0, "BCD");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
