//! The prompt and output security policy: detectors of secrets, personal data and destructive
//! commands ([`rules`]), the scanner that runs them ([`scan`]), and what a project's policy does
//! with what they find ([`engine`]).

pub mod engine;
pub mod rules;
pub mod scan;

pub use engine::{OutputScan, Policies, Policy, Screening};
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

    #[test]
    fn the_schemas_know_every_built_in_rule() {
        let ids: Vec<&str> = rules::BUILTIN.iter().map(|r| r.id).collect();
        assert_eq!(ids, loom_schemas::project::BUILTIN_RULES);
    }

    fn policy(json: &str) -> Policy {
        Policy::compile(&loom_schemas::project::SecurityPolicy::parse(json).unwrap()).unwrap()
    }

    fn digest(text: &[u8]) -> Vec<u8> {
        vec![u8::try_from(text.len()).unwrap_or(255)]
    }

    const KEY: &str = "sk-proj-Q7vN2mXk4LpR9sTz8WcYb3HdJf6GaKe1UoPi5Vn0BrMq";

    #[test]
    fn a_prompt_is_blocked_redacted_or_flagged_rule_by_rule_and_never_keeps_what_it_hides() {
        use loom_schemas::event::PolicyAction;
        use serde_json::json;

        let policy = policy(
            r#"{"rules":{"openai_api_key":"redact","email":"flag","phone_number":"off"},
                "blocked_keywords":["project bluebird"]}"#,
        );
        let mut request = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "call +1 415 555 0199"},
                {"role": "user", "content": [{"type": "text", "text": format!("use {KEY}, ask ada@example.com")}]},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "f", "arguments": format!("{{\"key\":\"{KEY}\"}}")}}]},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,c2stcHJvai1h"}}]}
            ]
        });
        let screening = policy.screen(&mut request, &digest).unwrap();
        assert_eq!(screening.action, PolicyAction::Redact);
        assert!(screening.blocking.is_empty());
        let found: Vec<(&str, &str, &str)> = screening
            .findings
            .iter()
            .map(|f| (f.rule.as_str(), f.action.as_str(), f.location.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("openai_api_key", "redact", "messages[1].content[0].text"),
                ("email", "flag", "messages[1].content[0].text"),
                (
                    "openai_api_key",
                    "redact",
                    "messages[2].tool_calls[0].function.arguments"
                ),
            ]
        );
        let first = &screening.findings[0];
        assert_eq!((first.start, first.end), (4, 4 + KEY.len() as i64));
        assert_eq!(first.digest, [KEY.len() as u8]);
        assert_eq!(first.severity, "critical");
        // The forwarded `messages` hold no key; the email (flagged) stays.
        assert_eq!(screening.redacted.len(), 1);
        assert_eq!(screening.redacted[0].0, "messages");
        let sent = &screening.redacted[0].1;
        assert!(!sent.contains(KEY), "{sent}");
        assert!(sent.contains("sk-proj-****BrMq") && sent.contains("ada@example.com"));
        assert_eq!(request["messages"].to_string(), *sent);

        // A blocked keyword refuses the request, and what was found is hidden all the same.
        let mut request = json!({"input": format!("About Project Bluebird: {KEY}")});
        let screening = policy.screen(&mut request, &digest).unwrap();
        assert_eq!(screening.action, PolicyAction::Block);
        assert_eq!(screening.blocking, ["blocked_keyword"]);
        assert!(!request.to_string().contains(KEY));

        // Nothing found: no screening; rules that are off do not run.
        let mut clean = json!({"messages": [{"role": "user", "content": "call 415 555 0199"}]});
        assert!(policy.screen(&mut clean, &digest).is_none());
        let off = self::policy(r#"{"default_action":"off"}"#);
        let mut request = json!({"messages": [{"role": "user", "content": KEY}]});
        assert!(off.screen(&mut request, &digest).is_none());
    }

    #[test]
    fn an_answer_is_scanned_across_pieces_each_finding_once() {
        let policy = policy(r#"{"rules":{"openai_api_key":"block"}}"#);
        let answer = format!(
            "Here it is: {KEY} and mail ada@example.com. {}",
            "x".repeat(600)
        );
        let mut scan = OutputScan::default();
        let mut text = String::new();
        // Token-sized pieces, as a stream brings them.
        for piece in answer.as_bytes().chunks(3) {
            text.push_str(std::str::from_utf8(piece).unwrap());
            policy.scan_output(&mut scan, &text, false, &digest);
        }
        policy.scan_output(&mut scan, &text, true, &digest);
        let found: Vec<(&str, i64)> = scan
            .findings
            .iter()
            .map(|f| (f.rule.as_str(), f.start))
            .collect();
        assert_eq!(
            found,
            [
                ("openai_api_key", 12),
                ("email", 12 + KEY.len() as i64 + 10)
            ]
        );
        assert!(scan.findings.iter().all(|f| f.location == "output"));
        assert_eq!(scan.findings[0].end, 12 + KEY.len() as i64);
        // Flagged, not cut: the project did not choose to cut answers.
        assert!(scan.cut.is_empty());
        assert_eq!(scan.action(), Some(loom_schemas::event::PolicyAction::Flag));

        // A project that cuts: the piece completing enough of the key cuts the answer.
        let policy = self::policy(r#"{"rules":{"openai_api_key":"block"},"outputs":"cut"}"#);
        let mut scan = OutputScan::default();
        let mut text = String::new();
        let mut cut_at = None;
        for piece in answer.as_bytes().chunks(3) {
            text.push_str(std::str::from_utf8(piece).unwrap());
            policy.scan_output(&mut scan, &text, false, &digest);
            if !scan.cut.is_empty() {
                cut_at = Some(text.len());
                break;
            }
        }
        assert_eq!(scan.cut, ["openai_api_key"]);
        assert!(cut_at.unwrap() < 12 + KEY.len(), "cut at {cut_at:?}");
    }
}
