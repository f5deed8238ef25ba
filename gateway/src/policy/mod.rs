//! The prompt and output security policy: detectors of secrets, personal data and destructive
//! commands ([`rules`]), and the scanner that runs them ([`scan`]).

pub mod rules;
pub mod scan;

pub use scan::{CustomRule, Finding, Kind, RuleError, Scanner, Severity};

/// The scanner of the built-in rules alone.
pub fn builtin() -> Result<Scanner, RuleError> {
    Scanner::new(rules::BUILTIN, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule ids found in `text`, sorted.
    fn found(scanner: &Scanner, text: &str) -> Vec<String> {
        let mut findings = Vec::new();
        scanner.scan(text.as_bytes(), &mut findings);
        let mut ids: Vec<String> = findings
            .iter()
            .map(|f| scanner.rules()[f.rule].id.to_string())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Texts that hold what a rule looks for (made up here: none of them is anyone's).
    const TRUE_POSITIVES: &[(&str, &str)] = &[
        (
            "openai_api_key",
            "key: sk-proj-Q7vN2mXk4LpR9sTz8WcYb3HdJf6GaKe1UoPi5Vn0BrMq",
        ),
        (
            "openai_api_key",
            "OPENAI_API_KEY=sk-svcacct-h4Rt9ZmQ2vLx8NcK5pWb7YdJ3sFg",
        ),
        (
            "openai_api_key",
            "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",
        ),
        (
            "anthropic_api_key",
            "use sk-ant-api03-Zx9Kq2Lm7Np4Rt8Vw3Yb6Hd1Jf5Gs0Ue2Ic-AAAA please",
        ),
        (
            "aws_access_key_id",
            "aws_access_key_id = AKIAQ3EGT7RZ4KD2LM5N",
        ),
        (
            "github_token",
            "token ghp_9aZk3LmQ7xW2pR5tY8uV1sN4bC6dF0gH3jK7 ok",
        ),
        (
            "github_token",
            "github_pat_11ABCDE2F0aZk3LmQ7xW2pR5tY8uV1sN4bC6dF0gH3jK7mP9qR2sT5vW8yZ1bC4dE",
        ),
        ("gitlab_token", "glpat-x8Kz2Qm5Lr9Tn3Vb7Wc1"),
        (
            "slack_token",
            "SLACK=xoxb-2487302938-5830293847-Zk3LmQ7xW2pR5tY8uV1sN4b",
        ),
        (
            "slack_token",
            "https://hooks.slack.com/services/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",
        ),
        (
            "private_key",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAx4Zk3LmQ7xW2pR5t\nY8uV1sN4bC6dF0gH3jK7mP9qR2sT5vW8\n-----END RSA PRIVATE KEY-----",
        ),
        (
            "private_key",
            "here: -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ",
        ),
        (
            "jwt",
            "Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk",
        ),
        ("payment_card", "card 4111 1111 1111 1111 exp 12/29"),
        ("payment_card", "5500-0000-0000-0004"),
        ("payment_card", "amex 378282246310005"),
        ("us_ssn", "SSN: 536-22-8012"),
        ("iban", "IBAN DE89 3704 0044 0532 0130 00"),
        ("iban", "GB82WEST12345698765432"),
        ("email", "write to ada.lovelace@example.org today"),
        ("phone_number", "call (415) 555-0132 or"),
        ("phone_number", "+44 20 7946 0958"),
        ("sql_destructive", "then run DROP TABLE users; and"),
        ("sql_destructive", "delete  from accounts where 1=1"),
        ("sql_destructive", "TRUNCATE orders;"),
        ("shell_destructive", "just rm -rf / and go"),
        ("shell_destructive", "sudo rm /etc/passwd"),
        ("shell_destructive", "format C: /q"),
        ("shell_destructive", ":(){ :|:& };:"),
        ("shell_destructive", "dd if=/dev/zero of=/dev/sda"),
    ];

    /// Texts that look like something a rule looks for, and are not.
    const TRAPS: &[&str] = &[
        "request 123e4567-e89b-12d3-a456-426614174000 failed",
        "commit 9fceb02d0ae598e95dc970b74767f19372d61af8 and 3f786850e387550fdab836ed7e6dc881de23001b",
        "blob: aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQgZW5jb2RlZCBkYXRhIHRoYXQgaXMgbG9uZw==",
        "AWS docs: AKIAIOSFODNN7EXAMPLE with secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "OPENAI_API_KEY=sk-proj-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "export GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "Lorem ipsum 4111 1111 1111 1112 dolor sit amet 1234 5678 9012 3456",
        "order 000-12-3456 and 666-45-6789 and 912-34-5678 and 123-00-4567",
        "IBAN DE89 3704 0044 0532 0130 01 is mistyped",
        "version 1.2.3, released 2024-01-15, build 20240115",
        "the ratio 3.14159265358979 and timestamp 1700000000000",
        "truncate the text and delete the old files; drop the tables from the chart",
        "rm -rf /tmp/build and format the output",
        "eyJ is how a base64 JSON begins",
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC public key, not private",
    ];

    #[test]
    fn every_detector_finds_its_true_positives() {
        let scanner = builtin().unwrap();
        for (rule, text) in TRUE_POSITIVES {
            assert_eq!(found(&scanner, text), [*rule], "{text}");
        }
        // Every built-in rule has a true positive here.
        for rule in rules::BUILTIN {
            assert!(
                TRUE_POSITIVES.iter().any(|(id, _)| *id == rule.id),
                "{}",
                rule.id
            );
        }
    }

    #[test]
    fn false_positive_traps_are_not_findings() {
        let scanner = builtin().unwrap();
        for text in TRAPS {
            assert_eq!(found(&scanner, text), Vec::<String>::new(), "{text}");
        }
    }

    #[test]
    fn redaction_keeps_the_known_prefix_and_the_last_four() {
        let scanner = builtin().unwrap();
        let text = "key sk-proj-Q7vN2mXk4LpR9sTz8WcYb3HdJf6GaKe1UoPi5Vn0BrMq and card 4111 1111 1111 1111.";
        let mut findings = Vec::new();
        scanner.scan(text.as_bytes(), &mut findings);
        assert_eq!(
            scanner.redact(text, &findings),
            "key sk-proj-****BrMq and card ****1111."
        );
        // Short matches keep nothing; overlapping findings are redacted once.
        let text = "ada@ex.io";
        let mut findings = Vec::new();
        scanner.scan(text.as_bytes(), &mut findings);
        findings.push(findings[0]);
        assert_eq!(scanner.redact(text, &findings), "****");
    }

    #[test]
    fn custom_rules_run_behind_their_keywords_and_bad_ones_are_refused() {
        let custom = [
            CustomRule {
                id: "codename".into(),
                pattern: r"(?i)project\s+bluebird".into(),
                keywords: vec!["bluebird".into()],
                severity: Severity::Medium,
            },
            CustomRule {
                id: "ticket".into(),
                pattern: r"\bSEC-\d{4,}\b".into(),
                keywords: Vec::new(),
                severity: Severity::Low,
            },
        ];
        let scanner = Scanner::new(rules::BUILTIN, &custom).unwrap();
        assert_eq!(
            found(&scanner, "About Project  BlueBird, see SEC-20931."),
            ["codename", "ticket"]
        );
        let bad = |pattern: &str| CustomRule {
            id: "bad".into(),
            pattern: pattern.into(),
            keywords: Vec::new(),
            severity: Severity::Low,
        };
        let error = Scanner::new(&[], &[bad("(unclosed")]).unwrap_err();
        assert!(error.to_string().starts_with("rule bad:"), "{error}");
        let error = Scanner::new(&[], &[bad(r"\w{1000}{1000}")]).unwrap_err();
        assert!(
            error.to_string().contains("compiles to more than"),
            "{error}"
        );
        let many = vec![bad("x"); scan::MAX_RULES + 1];
        assert!(matches!(Scanner::new(&[], &many), Err(RuleError::TooMany)));
    }
}
