//! Time: windows named by the caller, and calendar buckets in a time zone.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use utoipa::ToSchema;

use super::AnalyticsError;

/// A time range, `[from, to)`, in µs since the epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from_us: i64,
    pub to_us: i64,
}

/// The longest window a question may span.
const MAX_WINDOW_US: i64 = 400 * 86_400_000_000;

impl Window {
    /// The window `from`/`to` or `window` name (default: the last 24 hours before `now_us`).
    /// `from` and `to` are RFC 3339 times, dates (midnight in `tz`) or Unix seconds; `window` is
    /// a length such as `15m`, `1h`, `24h`, `7d`, `30d` ending at `to` (default now).
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        window: Option<&str>,
        now_us: i64,
        tz: Tz,
    ) -> Result<Window, AnalyticsError> {
        let to_us = match to {
            Some(to) => parse_time(to, tz, "to")?,
            None => now_us,
        };
        let from_us = match (from, window) {
            (Some(_), Some(_)) => {
                return Err(AnalyticsError::invalid(
                    "give either `from` (and `to`) or `window`, not both",
                ));
            }
            (Some(from), None) => parse_time(from, tz, "from")?,
            (None, Some(window)) => to_us - parse_length(window)?,
            (None, None) => to_us - 86_400_000_000,
        };
        if from_us >= to_us {
            return Err(AnalyticsError::invalid("`from` must be before `to`"));
        }
        if to_us - from_us > MAX_WINDOW_US {
            return Err(AnalyticsError::invalid(
                "a window spans at most 400 days; for longer, use /v1/sql over the archive",
            ));
        }
        Ok(Window { from_us, to_us })
    }

    pub fn len_us(&self) -> i64 {
        self.to_us - self.from_us
    }

    /// The window of the same length just before this one.
    pub fn previous(&self) -> Window {
        Window {
            from_us: self.from_us - self.len_us(),
            to_us: self.from_us,
        }
    }
}

fn parse_time(text: &str, tz: Tz, name: &str) -> Result<i64, AnalyticsError> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.timestamp_micros());
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return local_start(tz, date.and_time(chrono::NaiveTime::MIN))
            .ok_or_else(|| AnalyticsError::invalid(format!("`{name}`: no such day in {tz}")));
    }
    if let Ok(seconds) = text.parse::<i64>()
        && let Some(micros) = seconds.checked_mul(1_000_000)
    {
        return Ok(micros);
    }
    Err(AnalyticsError::invalid(format!(
        "`{name}` must be an RFC 3339 time (2026-12-04T09:00:00Z), a date (2026-12-04) or Unix \
         seconds; got {text:?}"
    )))
}

/// `15m`, `1h`, `24h`, `7d`, `2w` in µs.
fn parse_length(text: &str) -> Result<i64, AnalyticsError> {
    let bad = || {
        AnalyticsError::invalid(format!(
            "`window` must be a number and a unit, such as 15m, 1h, 24h, 7d or 30d; got {text:?}"
        ))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().map_err(|_| bad())?;
    let unit_us: i64 = match unit {
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        "w" => 7 * 86_400_000_000,
        _ => return Err(bad()),
    };
    match number.checked_mul(unit_us) {
        Some(length) if length > 0 => Ok(length),
        _ => Err(bad()),
    }
}

/// The instant a local time in `tz` names (its first, if the clock went back; the first after
/// the gap, if the clock jumped over it).
pub(super) fn local_start(tz: Tz, local: NaiveDateTime) -> Option<i64> {
    (0..4)
        .find_map(|hours| {
            tz.from_local_datetime(&(local + Duration::minutes(30 * hours)))
                .earliest()
        })
        .map(|at| at.timestamp_micros())
}

/// Calendar units a series is bucketed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

/// The most buckets a series may have.
pub const MAX_BUCKETS: usize = 2_000;

impl Unit {
    /// `minute`, `hour`, `day`, `week`, `month`, or `auto` (by the window's length: minutes up
    /// to 3 hours, hours up to 3 days, days beyond).
    pub fn parse(name: &str, window: Window) -> Option<Unit> {
        Some(match name {
            "auto" => match window.len_us() {
                len if len <= 3 * 3_600_000_000 => Unit::Minute,
                len if len <= 3 * 86_400_000_000 => Unit::Hour,
                _ => Unit::Day,
            },
            "minute" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            _ => return None,
        })
    }

    /// The start of the bucket holding `local`, in local time.
    fn truncate(self, local: NaiveDateTime) -> NaiveDateTime {
        let date = local.date();
        let day = date.and_time(chrono::NaiveTime::MIN);
        match self {
            Unit::Minute => day + Duration::minutes(i64::from(local.hour() * 60 + local.minute())),
            Unit::Hour => day + Duration::hours(i64::from(local.hour())),
            Unit::Day => day,
            Unit::Week => day - Duration::days(i64::from(date.weekday().num_days_from_monday())),
            Unit::Month => date
                .with_day(1)
                .unwrap_or(date)
                .and_time(chrono::NaiveTime::MIN),
        }
    }

    /// The start of the next bucket after the one starting at `local`.
    fn next(self, local: NaiveDateTime) -> NaiveDateTime {
        match self {
            Unit::Minute => local + Duration::minutes(1),
            Unit::Hour => local + Duration::hours(1),
            Unit::Day => local + Duration::days(1),
            Unit::Week => local + Duration::days(7),
            Unit::Month => local
                .checked_add_months(chrono::Months::new(1))
                .unwrap_or(local + Duration::days(31)),
        }
    }
}

/// The starts of the buckets of `unit` in `tz` that cover `window` (the first at or before its
/// start), in µs. Minutes and hours follow the clock in UTC steps, so the hour a clock repeats
/// is two buckets; days, weeks and months follow the calendar, so a day may last 23 or 25 hours.
pub fn bucket_starts(window: Window, unit: Unit, tz: Tz) -> Result<Vec<i64>, AnalyticsError> {
    let too_many = || {
        AnalyticsError::invalid(format!(
            "more than {MAX_BUCKETS} buckets: choose a coarser `bucket` or a shorter window"
        ))
    };
    let first_utc = DateTime::from_timestamp_micros(window.from_us)
        .ok_or_else(|| AnalyticsError::invalid("`from` is out of range"))?;
    let first_local = unit.truncate(first_utc.with_timezone(&tz).naive_local());
    let mut starts = Vec::new();
    match unit {
        Unit::Minute | Unit::Hour => {
            let step = if unit == Unit::Minute {
                60_000_000
            } else {
                3_600_000_000
            };
            let mut at = local_start(tz, first_local).unwrap_or(window.from_us);
            at = at.min(window.from_us);
            while at < window.to_us {
                if starts.len() == MAX_BUCKETS {
                    return Err(too_many());
                }
                starts.push(at);
                at += step;
            }
        }
        Unit::Day | Unit::Week | Unit::Month => {
            let mut local = first_local;
            loop {
                let Some(at) = local_start(tz, local) else {
                    local = unit.next(local);
                    continue;
                };
                if at >= window.to_us {
                    break;
                }
                if starts.len() == MAX_BUCKETS {
                    return Err(too_many());
                }
                starts.push(at);
                local = unit.next(local);
            }
        }
    }
    Ok(starts)
}

/// The widest time slot (in µs) every start in `starts` falls on, so that no slot straddles two
/// buckets: the database sums requests by slot, and slots fold into buckets.
pub(super) fn slot_us(starts: &[i64]) -> i64 {
    [
        86_400_000_000,
        3_600_000_000,
        900_000_000,
        60_000_000,
        1_000_000,
    ]
    .into_iter()
    .find(|slot| starts.iter().all(|s| s.rem_euclid(*slot) == 0))
    .unwrap_or(1)
}

/// An RFC 3339 time in µs.
pub(crate) fn parse_rfc3339(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// A time in µs as RFC 3339 (UTC).
pub fn rfc3339(us: i64) -> String {
    DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A time in µs as RFC 3339 in `tz`.
pub fn rfc3339_in(us: i64, tz: Tz) -> String {
    DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .with_timezone(&tz)
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The start (UTC) of the quota window `name` holding `now_us`.
pub(super) fn window_start(name: &str, now_us: i64) -> Option<i64> {
    let now = DateTime::from_timestamp_micros(now_us)?;
    let unit = match name {
        "minute" => Unit::Minute,
        "hour" => Unit::Hour,
        "day" => Unit::Day,
        "month" => Unit::Month,
        _ => return None,
    };
    Some(
        Utc.from_utc_datetime(&unit.truncate(now.naive_utc()))
            .timestamp_micros(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_the_zone_and_its_daylight_saving_changes() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let utc = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros();
        // 2026-11-01: the clocks go back an hour at 02:00 local, so that day lasts 25 hours.
        let window = Window {
            from_us: utc("2026-10-31T12:00:00Z"),
            to_us: utc("2026-11-03T00:00:00Z"),
        };
        let starts = bucket_starts(window, Unit::Day, tz).unwrap();
        let local: Vec<String> = starts.iter().map(|&s| rfc3339_in(s, tz)).collect();
        assert_eq!(
            local,
            [
                "2026-10-31T00:00:00-04:00",
                "2026-11-01T00:00:00-04:00",
                "2026-11-02T00:00:00-05:00"
            ]
        );
        assert_eq!(starts[2] - starts[1], 25 * 3_600_000_000);
        // Hours in a half-hour zone start at half past in UTC.
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        let hours = bucket_starts(
            Window {
                from_us: utc("2026-12-04T10:10:00Z"),
                to_us: utc("2026-12-04T12:00:00Z"),
            },
            Unit::Hour,
            kolkata,
        )
        .unwrap();
        assert_eq!(rfc3339(hours[0]), "2026-12-04T09:30:00Z");
        assert_eq!(slot_us(&hours), 900_000_000);
        assert_eq!(slot_us(&starts), 3_600_000_000);
    }

    #[test]
    fn windows_parse_from_names_dates_and_times() {
        let now = 1_800_000_000_000_000;
        let w = Window::parse(None, None, Some("7d"), now, Tz::UTC).unwrap();
        assert_eq!(w.len_us(), 7 * 86_400_000_000);
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let w = Window::parse(Some("2026-12-01"), Some("2026-12-02"), None, now, tz);
        assert_eq!(
            w.map(|w| (rfc3339(w.from_us), rfc3339(w.to_us))).ok(),
            Some(("2026-11-30T23:00:00Z".into(), "2026-12-01T23:00:00Z".into()))
        );
        for bad in [
            (Some("yesterday"), None, None),
            (None, None, Some("7x")),
            (Some("2026-12-02"), Some("2026-12-01"), None),
            (Some("2026-12-01"), None, Some("1h")),
        ] {
            assert!(matches!(
                Window::parse(bad.0, bad.1, bad.2, now, tz),
                Err(AnalyticsError::Invalid(_))
            ));
        }
    }
}
