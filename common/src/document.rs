//! The `lifeboat-backup` SSM document's parameters: their names, the `allowedPattern` each carries
//! in `ssm-documents/lifeboat-backup.json`, and the same checks in code, so the Lambda refuses a
//! value before SSM would (and can say why in its report).
//!
//! Every pattern admits what real deployments use and nothing a shell could misread: no quotes,
//! `$`, backticks, backslashes, semicolons, redirections or line breaks. A test keeps the document's
//! patterns and these checks in step.

use std::collections::HashMap;

/// The document's name, unless the deployment renames it.
pub const DEFAULT_DOCUMENT: &str = "lifeboat-backup";

/// One document parameter.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// The parameter's name in the document (and `SSM_<name>` in the script's environment).
    pub name: &'static str,
    /// Its `allowedPattern`, exactly as in the document.
    pub pattern: &'static str,
    check: fn(&str) -> bool,
}

impl Param {
    /// Whether `value` matches the parameter's pattern.
    pub fn allows(&self, value: &str) -> bool {
        (self.check)(value)
    }
}

fn group_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || " ._:/@+=,-".contains(c)
}

fn is_uuid(v: &str) -> bool {
    let groups: Vec<&str> = v.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Whether `v` is an EC2 instance id: `i-` and 8 to 17 lowercase hex digits.
pub fn is_instance_id(v: &str) -> bool {
    v.strip_prefix("i-").is_some_and(|hex| {
        (8..=17).contains(&hex.len())
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// The instance, or empty for "the instance the command runs on" (a command sent to many
/// instances at once carries one set of parameters for all of them).
pub const INSTANCE_ID: Param = Param {
    name: "InstanceId",
    pattern: "^(i-[0-9a-f]{8,17})?$",
    check: |v| v.is_empty() || is_instance_id(v),
};

/// The Auto Scaling group: letters, digits, space and `._:/@+=,-`.
pub const GROUP_NAME: Param = Param {
    name: "AutoScalingGroupName",
    pattern: "^[A-Za-z0-9 ._:/@+=,-]{1,255}$",
    check: |v| (1..=255).contains(&v.len()) && v.chars().all(group_char),
};

/// The terminate hook: what the Auto Scaling API itself allows.
pub const HOOK_NAME: Param = Param {
    name: "LifecycleHookName",
    pattern: "^[A-Za-z0-9_/-]{1,255}$",
    check: |v| {
        (1..=255).contains(&v.len())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_/-".contains(c))
    },
};

/// The action token (a UUID), or empty to complete by instance id.
pub const TOKEN: Param = Param {
    name: "LifecycleActionToken",
    pattern: "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$",
    check: |v| v.is_empty() || is_uuid(v),
};

/// Why the backup runs, as it appears in the object key.
pub const REASON: Param = Param {
    name: "Reason",
    pattern: "^[A-Za-z0-9 ._:/@+=,-]{1,100}$",
    check: |v| (1..=100).contains(&v.len()) && v.chars().all(group_char),
};

/// The hook's heartbeat timeout in seconds, as the Lambda read it, or empty (the agent then
/// describes the hook).
pub const HEARTBEAT_TIMEOUT: Param = Param {
    name: "HeartbeatTimeout",
    pattern: "^([1-9][0-9]{0,3})?$",
    check: |v| v.len() <= 4 && v.chars().all(|c| c.is_ascii_digit()) && !v.starts_with('0'),
};

/// When the lifecycle action began at the earliest (RFC 3339, UTC, whole seconds), or empty.
pub const BEGAN_AFTER: Param = Param {
    name: "ActionBeganAfter",
    pattern: "^([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z)?$",
    check: |v| {
        v.is_empty()
            || (v.len() == 20
                && v.char_indices().all(|(i, c)| match i {
                    4 | 7 => c == '-',
                    10 => c == 'T',
                    13 | 16 => c == ':',
                    19 => c == 'Z',
                    _ => c.is_ascii_digit(),
                }))
    },
};

/// Every parameter of `lifeboat-backup`.
pub const PARAMS: [Param; 7] = [
    INSTANCE_ID,
    GROUP_NAME,
    HOOK_NAME,
    TOKEN,
    REASON,
    HEARTBEAT_TIMEOUT,
    BEGAN_AFTER,
];

/// The values of one `lifeboat-backup` run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupParams {
    /// The instance; empty in a command sent to several instances (each runs it as itself).
    pub instance_id: String,
    /// Its Auto Scaling group.
    pub group: String,
    /// The terminate hook.
    pub hook: String,
    /// The action token.
    pub token: String,
    /// Why.
    pub reason: String,
    /// The hook's heartbeat timeout in seconds, or empty when not known.
    pub heartbeat_timeout: String,
    /// The action began after this time (RFC 3339), or empty when not known.
    pub began_after: String,
}

/// A value the document would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter {name} is not allowed by the document's pattern {pattern}: {value:?}")]
pub struct Refused {
    /// The parameter.
    pub name: &'static str,
    /// Its pattern.
    pub pattern: &'static str,
    /// The value, as received (Debug-quoted, so control characters show).
    pub value: String,
}

impl BackupParams {
    fn pairs(&self) -> [(Param, &str); 7] {
        [
            (INSTANCE_ID, &self.instance_id),
            (GROUP_NAME, &self.group),
            (HOOK_NAME, &self.hook),
            (TOKEN, &self.token),
            (REASON, &self.reason),
            (HEARTBEAT_TIMEOUT, &self.heartbeat_timeout),
            (BEGAN_AFTER, &self.began_after),
        ]
    }

    /// Checks every value against its pattern; the first refusal names the parameter.
    pub fn validate(&self) -> Result<(), Refused> {
        for (param, value) in self.pairs() {
            if !param.allows(value) {
                return Err(Refused {
                    name: param.name,
                    pattern: param.pattern,
                    value: value.chars().take(300).collect(),
                });
            }
        }
        Ok(())
    }

    /// The `Parameters` map of SendCommand.
    pub fn to_parameters(&self) -> HashMap<String, Vec<String>> {
        self.pairs()
            .into_iter()
            .map(|(p, v)| (p.name.to_owned(), vec![v.to_owned()]))
            .collect()
    }

    /// Reads the values back from a command's parameters (as a status-change event carries them).
    pub fn from_parameters(params: &HashMap<String, Vec<String>>) -> Option<Self> {
        let get = |p: Param| params.get(p.name)?.first().cloned();
        Some(BackupParams {
            instance_id: get(INSTANCE_ID)?,
            group: get(GROUP_NAME)?,
            hook: get(HOOK_NAME)?,
            token: get(TOKEN).unwrap_or_default(),
            reason: get(REASON).unwrap_or_default(),
            heartbeat_timeout: get(HEARTBEAT_TIMEOUT).unwrap_or_default(),
            began_after: get(BEGAN_AFTER).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCUMENT: &str = include_str!("../../ssm-documents/lifeboat-backup.json");

    #[test]
    fn the_document_carries_these_patterns() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        for p in PARAMS {
            assert_eq!(
                doc["parameters"][p.name]["allowedPattern"], p.pattern,
                "{}",
                p.name
            );
        }
        assert_eq!(doc["parameters"].as_object().unwrap().len(), PARAMS.len());
    }

    #[test]
    fn every_parameter_reaches_the_script_as_an_environment_variable() {
        // SSM reads `interpolationType` from each parameter's definition; as a step input it
        // would do nothing.
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        for p in PARAMS {
            assert_eq!(
                doc["parameters"][p.name]["interpolationType"], "ENV_VAR",
                "{}",
                p.name
            );
        }
        for step in doc["mainSteps"].as_array().unwrap() {
            assert!(step["inputs"].get("interpolationType").is_none(), "{step}");
        }
    }

    #[test]
    fn checks_agree_with_the_patterns() {
        let samples = [
            "",
            "i-0123456789abcdef0",
            "i-01234567",
            "i-0123456789abcdef01",
            "i-0123456",
            "i-0123456789ABCDEF0",
            "web",
            "my asg",
            "eks-nodes-2024:blue/green@x+y=z,w.v_u",
            "awseb-e-abc123-stack-AWSEBAutoScalingGroup-1ABCDEFGHIJ",
            "87654321-4321-4321-4321-210987654321",
            "87654321-4321-4321-4321-21098765432",
            "lifeboat",
            "lifeboat/terminate_hook-1",
            "scale-in",
            "300",
            "7200",
            "72000",
            "0",
            "030",
            "2026-11-27T08:00:00Z",
            "2026-11-27T08:00:00",
            "2026-11-27 08:00:00Z",
            "2026-11-27T08:00:00.5Z",
            "'; rm -rf / #",
            "$(touch /tmp/x)",
            "`id`",
            "a\nb",
            "a\n",
            "a\"b",
            "a\\b",
            "a;b",
            "a|b",
            "a&b",
            "a>b",
            "a*b",
            "x\u{e9}",
            &"g".repeat(255),
            &"g".repeat(256),
            &"r".repeat(101),
        ];
        for p in PARAMS {
            // Here `$` is the end of the text; in SSM (Java) it also matches before a final line
            // break. No class admits a line break, so the code refuses one either way.
            let re = regex::Regex::new(p.pattern).unwrap();
            for s in samples {
                let by_regex = re.is_match(s);
                assert_eq!(p.allows(s), by_regex, "{} on {s:?}", p.name);
            }
        }
    }

    #[test]
    fn validate_names_the_refused_parameter() {
        let mut params = BackupParams {
            instance_id: "i-0123456789abcdef0".into(),
            group: "web".into(),
            hook: "lifeboat".into(),
            token: String::new(),
            reason: "scale-in".into(),
            heartbeat_timeout: String::new(),
            began_after: String::new(),
        };
        assert!(params.validate().is_ok());
        assert_eq!(
            BackupParams::from_parameters(&params.to_parameters()),
            Some(params.clone())
        );
        params.group = "web$(reboot)".into();
        let err = params.validate().unwrap_err();
        assert_eq!(err.name, "AutoScalingGroupName");
        assert!(err.to_string().contains("web$(reboot)"), "{err}");
    }
}
