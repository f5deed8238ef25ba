//! Answers from the rollups the projector keeps (`rollups`, [`loom_projector::rollups`]): per UTC
//! hour and day, of all of a tenant's requests and per value of one dimension. A question filtered or
//! broken down by at most one dimension reads whole hours and days from them and only the
//! partial hours at the window's edges (and any time before the rollups began) from the traces;
//! the answers are the same as a pass over the traces gives.

use loom_projector::rollups::SPANS_US;

use super::{Dimension, Filters, Group, Window};

const HOUR_US: i64 = SPANS_US[0];
const DAY_US: i64 = SPANS_US[1];

/// A stretch of a window and where its requests are counted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Piece {
    /// The traces: any question, a pass over every request in it.
    Traces(Window),
    /// The rollup rows of this span (µs) that start in the window.
    Rollups(i64, Window),
}

/// A value the rollup rows of a dimension are narrowed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Value<'a> {
    Is(&'a str),
    /// Status: anything but `ok`.
    Failed,
}

/// The rollup rows that answer requests matching `filters`, grouped by `group`: a dimension ('' for
/// all requests) and the value its rows must have. None when more than one dimension is involved.
pub(super) fn rows_for(
    filters: &Filters,
    group: Group,
) -> Option<(&'static str, Option<Value<'_>>)> {
    let filtered = [
        ("project", &filters.project),
        ("user", &filters.user),
        ("key", &filters.key),
        ("model", &filters.model),
        ("provider", &filters.provider),
        ("deployment", &filters.deployment),
        ("status", &filters.status),
    ];
    let mut chosen: Option<(&'static str, Option<Value<'_>>)> = None;
    for (dimension, value) in filtered {
        let Some(value) = value.as_deref() else {
            continue;
        };
        if chosen.is_some() {
            return None;
        }
        let value = match (dimension, value) {
            ("status", "failed") => Value::Failed,
            (_, value) => Value::Is(value),
        };
        chosen = Some((dimension, Some(value)));
    }
    if let Group::By(by) = group
        && let Some(name) = by.rollup_dimension()
    {
        match chosen {
            None => chosen = Some((name, None)),
            Some((dimension, _)) if dimension == name => {}
            Some(_) => return None,
        }
    }
    Some(chosen.unwrap_or(("", None)))
}

impl Dimension {
    /// The rollups' name of the dimension; the tenant is on every row.
    fn rollup_dimension(self) -> Option<&'static str> {
        Some(match self {
            Dimension::Model => "model",
            Dimension::Provider => "provider",
            Dimension::Deployment => "deployment",
            Dimension::Project => "project",
            Dimension::User => "user",
            Dimension::Key => "key",
            Dimension::ErrorClass => "error_class",
            Dimension::Status => "status",
            Dimension::Tier => "tier",
            Dimension::Tenant => return None,
        })
    }
}

/// Where `window`'s requests, grouped by `group`, are counted from when the rollups hold those
/// that arrived from `since_us` on: whole days and hours from the rollups (if no group boundary
/// falls inside them), the rest from the traces.
pub(super) fn plan(window: Window, group: Group, since_us: i64) -> Vec<Piece> {
    let fits = |span: i64| match group {
        Group::Slot(slot) => slot % span == 0,
        Group::Split(_) | Group::By(_) => true,
    };
    if !fits(HOUR_US) {
        return vec![Piece::Traces(window)];
    }
    let mut cuts = vec![window.from_us];
    if let Group::Split(at) = group
        && window.from_us < at
        && at < window.to_us
    {
        cuts.push(at);
    }
    cuts.push(window.to_us);
    let mut pieces = Vec::new();
    let traces = |pieces: &mut Vec<Piece>, from_us: i64, to_us: i64| {
        if from_us < to_us {
            pieces.push(Piece::Traces(Window { from_us, to_us }));
        }
    };
    for stretch in cuts.windows(2) {
        let (from, to) = (stretch[0], stretch[1]);
        let start = ceil(from.max(since_us), HOUR_US);
        let end = floor(to, HOUR_US);
        if start >= end {
            traces(&mut pieces, from, to);
            continue;
        }
        traces(&mut pieces, from, start);
        let (first_day, last_day) = (ceil(start, DAY_US), floor(end, DAY_US));
        let mut rollups = |span: i64, from_us: i64, to_us: i64| {
            if from_us < to_us {
                pieces.push(Piece::Rollups(span, Window { from_us, to_us }));
            }
        };
        if fits(DAY_US) && first_day < last_day {
            rollups(HOUR_US, start, first_day);
            rollups(DAY_US, first_day, last_day);
            rollups(HOUR_US, last_day, end);
        } else {
            rollups(HOUR_US, start, end);
        }
        traces(&mut pieces, end, to);
    }
    // Neighbouring stretches of traces in one pass.
    pieces.dedup_by(|next, previous| match (previous, next) {
        (Piece::Traces(previous), Piece::Traces(next)) if previous.to_us == next.from_us => {
            previous.to_us = next.to_us;
            true
        }
        _ => false,
    });
    pieces
}

fn floor(us: i64, span: i64) -> i64 {
    us - us.rem_euclid(span)
}

fn ceil(us: i64, span: i64) -> i64 {
    floor(us, span) + if us.rem_euclid(span) == 0 { 0 } else { span }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_793_491_200_000_000; // 2026-11-01T00:00:00Z, a day's start

    fn w(from_us: i64, to_us: i64) -> Window {
        Window { from_us, to_us }
    }

    #[test]
    fn whole_days_and_hours_come_from_the_rollups_and_the_edges_from_the_traces() {
        let from = T0 - HOUR_US - 5;
        let to = T0 + 2 * DAY_US + 3 * HOUR_US + 7;
        let pieces = plan(w(from, to), Group::By(Dimension::Model), 0);
        assert_eq!(
            pieces,
            [
                Piece::Traces(w(from, T0 - HOUR_US)),
                Piece::Rollups(HOUR_US, w(T0 - HOUR_US, T0)),
                Piece::Rollups(DAY_US, w(T0, T0 + 2 * DAY_US)),
                Piece::Rollups(HOUR_US, w(T0 + 2 * DAY_US, T0 + 2 * DAY_US + 3 * HOUR_US)),
                Piece::Traces(w(T0 + 2 * DAY_US + 3 * HOUR_US, to)),
            ]
        );
    }

    #[test]
    fn no_rollup_row_straddles_a_split_a_slot_or_the_rollups_start() {
        let at = T0 + DAY_US + 30 * 60_000_000;
        let pieces = plan(w(T0, T0 + 2 * DAY_US), Group::Split(at), 0);
        assert_eq!(
            pieces,
            [
                Piece::Rollups(DAY_US, w(T0, T0 + DAY_US)),
                Piece::Traces(w(T0 + DAY_US, T0 + DAY_US + HOUR_US)),
                Piece::Rollups(HOUR_US, w(T0 + DAY_US + HOUR_US, T0 + 2 * DAY_US)),
            ]
        );
        // Hourly slots use no daily rows; 15-minute slots no rollups at all.
        let pieces = plan(w(T0, T0 + DAY_US), Group::Slot(HOUR_US), 0);
        assert_eq!(pieces, [Piece::Rollups(HOUR_US, w(T0, T0 + DAY_US))]);
        let window = w(T0, T0 + DAY_US);
        assert_eq!(
            plan(window, Group::Slot(900_000_000), 0),
            [Piece::Traces(window)]
        );
        // Before the rollups began: the traces.
        let since = T0 + 10 * HOUR_US + 1;
        assert_eq!(
            plan(window, Group::By(Dimension::User), since),
            [
                Piece::Traces(w(T0, T0 + 11 * HOUR_US)),
                Piece::Rollups(HOUR_US, w(T0 + 11 * HOUR_US, T0 + DAY_US)),
            ]
        );
    }

    #[test]
    fn one_dimension_at_most() {
        let none = Filters::default();
        assert_eq!(rows_for(&none, Group::Split(0)), Some(("", None)));
        assert_eq!(
            rows_for(&none, Group::By(Dimension::Tenant)),
            Some(("", None))
        );
        let model = Filters {
            model: Some("m".into()),
            tenant: Some("t".into()),
            ..Filters::default()
        };
        assert_eq!(
            rows_for(&model, Group::By(Dimension::Model)),
            Some(("model", Some(Value::Is("m"))))
        );
        assert_eq!(rows_for(&model, Group::By(Dimension::User)), None);
        let failed = Filters {
            status: Some("failed".into()),
            ..Filters::default()
        };
        assert_eq!(
            rows_for(&failed, Group::Slot(HOUR_US)),
            Some(("status", Some(Value::Failed)))
        );
        let two = Filters {
            user: Some("u".into()),
            ..model
        };
        assert_eq!(rows_for(&two, Group::Split(0)), None);
    }
}
