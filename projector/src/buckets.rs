//! The latency buckets that analytics' histograms count by: 202 log-spaced buckets, each
//! 2^(1/8) wider than the one before, so that a percentile estimated from them lies within one
//! bucket (9.1 %) of the exact value. The rollups ([`crate::write`]) and the queries over the
//! traces (`loom-query`) bucket alike.

use std::fmt::Write as _;
use std::sync::LazyLock;

/// Buckets per doubling of the value: each bucket's upper bound is 2^(1/8) ≈ 1.0905 times its
/// lower one.
pub const PER_DOUBLING: f64 = 8.0;
/// The upper bound of the first bucket, in µs (it holds everything from 0).
pub const FIRST_BOUND_US: f64 = 100.0;
/// How many bounds: the last is 100 µs · 2^25 ≈ 56 minutes; above it is one overflow bucket.
pub const BOUNDS: usize = 201;

/// The buckets' upper bounds (inclusive), in µs.
pub static BOUND_US: LazyLock<Vec<i64>> = LazyLock::new(|| {
    (0..BOUNDS)
        .map(|i| (FIRST_BOUND_US * 2f64.powf(i as f64 / PER_DOUBLING)).round() as i64)
        .collect()
});

/// The bucket of `column` as SQL: a binary search over the bounds (8 comparisons a row), the
/// same on Postgres and SQLite (which has no logarithm); -1 when the column is NULL.
pub fn bucket_sql(column: &str) -> String {
    fn search(sql: &mut String, column: &str, lo: usize, hi: usize) {
        if lo == hi {
            let _ = write!(sql, "{lo}");
            return;
        }
        let mid = (lo + hi) / 2;
        let _ = write!(sql, "CASE WHEN {column} <= {} THEN ", BOUND_US[mid]);
        search(sql, column, lo, mid);
        sql.push_str(" ELSE ");
        search(sql, column, mid + 1, hi);
        sql.push_str(" END");
    }
    let mut sql = format!("CAST(CASE WHEN {column} IS NULL THEN -1 ELSE ");
    search(&mut sql, column, 0, BOUNDS);
    sql.push_str(" END AS BIGINT)");
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_sql_is_a_binary_search_over_the_bounds() {
        let sql = bucket_sql("x");
        assert_eq!(sql.matches("CASE WHEN x <=").count(), BOUNDS);
        assert!(sql.starts_with("CAST(CASE WHEN x IS NULL THEN -1"));
    }
}
