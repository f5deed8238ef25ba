//! The scanner: a keyword prefilter (Aho-Corasick over every rule's keywords, case-insensitive)
//! picks the rules whose regexes run over a text; each match is then checked (Luhn, mod-97,
//! entropy, …) before it is a finding. The built-in rules with no keywords (card numbers,
//! phone numbers) are first run together as one `RegexSet`, which only says which of them match
//! (`loom bench policy` measured it ~6 times faster than running each); only those then run to
//! find where. A project's rules without keywords run on every text.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use base64::Engine;
use regex::bytes::{Regex, RegexSet, RegexSetBuilder};

/// What a rule finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Secret,
    Pii,
    Command,
    Custom,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Secret => "secret",
            Kind::Pii => "pii",
            Kind::Command => "command",
            Kind::Custom => "custom",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(name: &str) -> Option<Severity> {
        [
            Severity::Low,
            Severity::Medium,
            Severity::High,
            Severity::Critical,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// How a regex match is confirmed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    None,
    /// A payment card number: 13–19 digits, a known issuer prefix, the Luhn checksum.
    Luhn,
    /// A US SSN: no area 000, 666 or 9xx, no group 00, no serial 0000.
    Ssn,
    /// An IBAN: 15–34 characters, mod-97 = 1.
    Iban,
    /// A JWT: its header decodes to a JSON object with `alg`.
    Jwt,
    /// 10–15 digits.
    Phone,
    /// Random enough (Shannon entropy of the part after the known prefix, bits per character),
    /// and not a placeholder (`EXAMPLE`, `xxxx`).
    Entropy(f32),
}

/// A built-in rule ([`super::rules::BUILTIN`]).
#[derive(Debug, Clone)]
pub struct RuleDef {
    pub id: &'static str,
    pub kind: Kind,
    pub severity: Severity,
    /// Any of these (case-insensitively) must occur in a text for the regex to run over it;
    /// none: it always runs.
    pub keywords: &'static [&'static str],
    pub pattern: &'static str,
    pub check: Check,
    /// Known prefixes, kept when a match is redacted (the longest that fits).
    pub prefixes: &'static [&'static str],
}

/// A project's own rule: a regex, run where one of its keywords occurs (or everywhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomRule {
    pub id: String,
    pub pattern: String,
    pub keywords: Vec<String>,
    pub severity: Severity,
}

pub use loom_schemas::project::REGEX_SIZE_LIMIT;

/// A rule, compiled.
#[derive(Debug)]
pub struct Rule {
    pub id: Box<str>,
    pub kind: Kind,
    pub severity: Severity,
    regex: Regex,
    check: Check,
    prefixes: &'static [&'static str],
}

/// Where a rule matched in a text (byte offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// The rule's index in its [`Scanner`].
    pub rule: usize,
    pub start: usize,
    pub end: usize,
}

/// The most rules one scanner holds (built-in and a project's own).
pub const MAX_RULES: usize = 128;

/// Rules, and the prefilter that picks which of them run over a text.
#[derive(Debug)]
pub struct Scanner {
    rules: Vec<Rule>,
    prefilter: AhoCorasick,
    /// The rule of each prefilter keyword.
    keyword_rules: Vec<usize>,
    /// Project rules with no keywords, as a bit set: they run over every text.
    ungated: u128,
    /// Built-in rules with no keywords (cards, SSNs, IBANs, phones), as one set: one pass over
    /// a text says which of them match at all, and only those run to find where.
    ungated_set: RegexSet,
    /// The rule of each pattern of `ungated_set`.
    ungated_set_rules: Vec<usize>,
}

/// Why a rule cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("rule {id}: {reason}")]
    Regex { id: String, reason: String },
    #[error("more than {MAX_RULES} rules")]
    TooMany,
    #[error("the keyword prefilter: {0}")]
    Prefilter(String),
}

/// Compiles a rule's pattern with the size limits every rule has.
pub fn compile(id: &str, pattern: &str, unicode: bool) -> Result<Regex, RuleError> {
    loom_schemas::project::compile_pattern(pattern, unicode).map_err(|reason| RuleError::Regex {
        id: id.to_owned(),
        reason,
    })
}

impl Scanner {
    /// A scanner of the built-in `rules` (ASCII patterns) and a project's own (Unicode-aware).
    pub fn new(rules: &[RuleDef], custom: &[CustomRule]) -> Result<Scanner, RuleError> {
        if rules.len() + custom.len() > MAX_RULES {
            return Err(RuleError::TooMany);
        }
        // Each rule, and the keywords that let it run.
        let mut gated: Vec<(Rule, Vec<&str>)> = Vec::with_capacity(rules.len() + custom.len());
        for def in rules {
            let rule = Rule {
                id: def.id.into(),
                kind: def.kind,
                severity: def.severity,
                regex: compile(def.id, def.pattern, false)?,
                check: def.check,
                prefixes: def.prefixes,
            };
            gated.push((rule, def.keywords.to_vec()));
        }
        for def in custom {
            let rule = Rule {
                id: def.id.as_str().into(),
                kind: Kind::Custom,
                severity: def.severity,
                regex: compile(&def.id, &def.pattern, true)?,
                check: Check::None,
                prefixes: &[],
            };
            gated.push((rule, def.keywords.iter().map(String::as_str).collect()));
        }
        let mut compiled = Vec::with_capacity(gated.len());
        let (mut keywords, mut keyword_rules) = (Vec::new(), Vec::new());
        let mut ungated = 0u128;
        let (mut set_patterns, mut ungated_set_rules) = (Vec::new(), Vec::new());
        for (index, (rule, gate)) in gated.into_iter().enumerate() {
            match (gate.is_empty(), rules.get(index)) {
                (true, Some(def)) => {
                    set_patterns.push(def.pattern);
                    ungated_set_rules.push(index);
                }
                (true, None) => ungated |= 1 << index,
                (false, _) => {}
            }
            keyword_rules.extend(gate.iter().map(|_| index));
            keywords.extend(gate);
            compiled.push(rule);
        }
        let prefilter = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard)
            .build(&keywords)
            .map_err(|e| RuleError::Prefilter(e.to_string()))?;
        let ungated_set = RegexSetBuilder::new(set_patterns)
            .unicode(false)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| RuleError::Prefilter(e.to_string()))?;
        Ok(Scanner {
            rules: compiled,
            prefilter,
            keyword_rules,
            ungated,
            ungated_set,
            ungated_set_rules,
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Adds the findings in `text` to `findings`, by rule, then by position.
    pub fn scan(&self, text: &[u8], findings: &mut Vec<Finding>) {
        let mut run = self.ungated;
        if !self.ungated_set_rules.is_empty() {
            for pattern in self.ungated_set.matches(text).iter() {
                run |= 1 << self.ungated_set_rules[pattern];
            }
        }
        for found in self.prefilter.find_overlapping_iter(text) {
            run |= 1 << self.keyword_rules[found.pattern().as_usize()];
        }
        while run != 0 {
            let index = run.trailing_zeros() as usize;
            run &= run - 1;
            let rule = &self.rules[index];
            for found in rule.regex.find_iter(text) {
                if rule.confirms(found.as_bytes()) {
                    findings.push(Finding {
                        rule: index,
                        start: found.start(),
                        end: found.end(),
                    });
                }
            }
        }
    }

    /// `text` with every finding replaced by its rule's known prefix, `****` and its last four
    /// characters (all of it when it is too short to keep any).
    pub fn redact(&self, text: &str, findings: &[Finding]) -> String {
        let mut spans: Vec<&Finding> = findings.iter().collect();
        spans.sort_by_key(|f| (f.start, std::cmp::Reverse(f.end)));
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for finding in spans {
            if finding.end <= at {
                continue; // inside one already redacted
            }
            let start = finding.start.max(at);
            let (Some(before), Some(secret)) = (text.get(at..start), text.get(start..finding.end))
            else {
                continue;
            };
            out.push_str(before);
            let prefix = self.rules[finding.rule]
                .prefixes
                .iter()
                .filter(|p| secret.starts_with(**p))
                .max_by_key(|p| p.len())
                .copied()
                .unwrap_or("");
            out.push_str(prefix);
            out.push_str("****");
            let rest = &secret[prefix.len()..];
            let chars = rest.chars().count();
            if chars >= 12 {
                let keep = rest
                    .char_indices()
                    .nth(chars - 4)
                    .map_or(rest.len(), |(i, _)| i);
                out.push_str(&rest[keep..]);
            }
            at = finding.end;
        }
        out.push_str(text.get(at..).unwrap_or(""));
        out
    }
}

impl Rule {
    fn confirms(&self, found: &[u8]) -> bool {
        match self.check {
            Check::None => true,
            Check::Luhn => luhn_card(found),
            Check::Ssn => ssn(found),
            Check::Iban => iban(found),
            Check::Jwt => jwt(found),
            Check::Phone => {
                (10..=15).contains(&found.iter().filter(|b| b.is_ascii_digit()).count())
            }
            Check::Entropy(bits) => {
                let prefix = self
                    .prefixes
                    .iter()
                    .filter(|p| found.starts_with(p.as_bytes()))
                    .map(|p| p.len())
                    .max()
                    .unwrap_or(0);
                let body = &found[prefix..];
                !placeholder(body) && entropy(body) >= bits
            }
        }
    }
}

/// Shannon entropy in bits per byte.
fn entropy(bytes: &[u8]) -> f32 {
    if bytes.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    let n = bytes.len() as f32;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f32 / n;
            -p * p.log2()
        })
        .sum()
}

/// A documented example or a template, not a key.
fn placeholder(body: &[u8]) -> bool {
    let lower = body.to_ascii_lowercase();
    [
        "example",
        "xxxxxx",
        "your_",
        "your-",
        "placeholder",
        "dummy",
    ]
    .iter()
    .any(|p| lower.windows(p.len()).any(|w| w == p.as_bytes()))
}

fn digits(found: &[u8]) -> Vec<u8> {
    found
        .iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| b - b'0')
        .collect()
}

fn luhn_card(found: &[u8]) -> bool {
    let digits = digits(found);
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let prefix = |n: usize| digits[..n].iter().fold(0u32, |a, d| a * 10 + u32::from(*d));
    // The issuers' prefixes, each with its numbers' lengths.
    let issuer = match digits.len() {
        15 => matches!(prefix(2), 34 | 37),
        len => {
            (prefix(1) == 4 && matches!(len, 13 | 16 | 19))
                || (len == 16
                    && ((51..=55).contains(&prefix(2)) || (2221..=2720).contains(&prefix(4))))
                || (len >= 16
                    && (prefix(4) == 6011
                        || matches!(prefix(2), 65 | 35 | 62)
                        || (644..=649).contains(&prefix(3))))
                || (len >= 14 && (matches!(prefix(2), 36 | 38) || (300..=305).contains(&prefix(3))))
        }
    };
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            match i % 2 {
                1 if d * 2 > 9 => d * 2 - 9,
                1 => d * 2,
                _ => d,
            }
        })
        .sum();
    issuer && sum.is_multiple_of(10)
}

fn ssn(found: &[u8]) -> bool {
    let digits = digits(found);
    if digits.len() != 9 {
        return false;
    }
    let number = |range: std::ops::Range<usize>| {
        digits[range]
            .iter()
            .fold(0u32, |a, d| a * 10 + u32::from(*d))
    };
    let (area, group, serial) = (number(0..3), number(3..5), number(5..9));
    // 078-05-1120 and 219-09-9999 were printed in advertisements: not anyone's.
    area != 0
        && area != 666
        && area < 900
        && group != 0
        && serial != 0
        && !matches!((area, group, serial), (78, 5, 1120) | (219, 9, 9999))
}

fn iban(found: &[u8]) -> bool {
    let compact: Vec<u8> = found.iter().copied().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut remainder = 0u32;
    for &b in tail.iter().chain(head) {
        let value = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        remainder = match value {
            0..=9 => (remainder * 10 + value) % 97,
            _ => (remainder * 100 + value) % 97,
        };
    }
    remainder == 1
}

fn jwt(found: &[u8]) -> bool {
    let Some(header) = found.split(|b| *b == b'.').next() else {
        return false;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&json)
        .is_ok_and(|header| header.contains_key("alg"))
}
