//! `sshKeys`: which entries are SSH public key lines, and what `authorized_keys` holds.
//!
//! An entry is exactly one public key as `ssh-keygen` prints it: `<type> <base64 blob>
//! [comment]`. No `authorized_keys` options (`command=`, `from=`, …) and no line breaks, so one
//! entry is one key that the API shows as one entry. The blob must decode, and it must name the
//! same key type as its first field (that is what sshd checks first): a truncated paste or a
//! private key pasted by mistake is caught here with a message rather than silently ignored by
//! sshd.
//!
//! The CRD's schema says the same with a regular expression (`uwsgi_it_api::container`), so
//! `kubectl apply` refuses most mistakes; the agent checks again with [`parse_key_line`], which
//! also decodes the blob, before it writes anything.
//!
//! The file the agent writes starts with [`MANAGED_HEADER`]. That line is how the agent knows a
//! file is its own: it replaces or removes only such a file, and leaves one the customer wrote
//! by hand alone.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Key types sshd accepts in `authorized_keys` (OpenSSH 9; DSA keys are no longer accepted by
/// default but are still valid lines).
pub const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// The first line of every `authorized_keys` the agent writes.
pub const MANAGED_HEADER: &str =
    "# Written by uwsgi-it-operator from this Container's sshKeys; edit sshKeys, not this file.";

/// Why an `sshKeys` entry is not a public key line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sshKeys[{index}]: {problem}")]
pub struct SshKeyError {
    /// Position of the entry.
    pub index: usize,
    /// What is wrong with it.
    pub problem: KeyLineProblem,
}

/// What is wrong with one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLineProblem {
    /// A line break, NUL or other control character.
    ControlCharacter,
    /// The first field is not a known key type (options such as `command=` land here too).
    UnknownType { found: String },
    /// No blob after the type.
    MissingBlob,
    /// The blob is not base64.
    NotBase64,
    /// The blob decodes but does not start with the key type given in the first field.
    TypeMismatch { declared: String },
}

impl fmt::Display for KeyLineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyLineProblem::ControlCharacter => f.write_str(
                "contains a line break or another control character; each entry must be one key line",
            ),
            KeyLineProblem::UnknownType { found } => write!(
                f,
                "starts with {found:?}, which is not an SSH public key type (expected one of {}; authorized_keys options are not allowed)",
                KEY_TYPES.join(", ")
            ),
            KeyLineProblem::MissingBlob => {
                f.write_str("has no key data after the key type (expected \"<type> <base64> [comment]\")")
            }
            KeyLineProblem::NotBase64 => f.write_str("its key data is not base64"),
            KeyLineProblem::TypeMismatch { declared } => write!(
                f,
                "its key data is not a {declared} public key (truncated, or pasted from another key)"
            ),
        }
    }
}

/// One valid entry, as it goes into `authorized_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLine {
    /// The key type (first field).
    pub key_type: String,
    /// The whole line, trimmed, with single spaces between the fields.
    pub line: String,
}

/// Checks one entry; surrounding blanks are ignored.
pub fn parse_key_line(index: usize, entry: &str) -> Result<KeyLine, SshKeyError> {
    let fail = |problem| SshKeyError { index, problem };
    if entry.chars().any(char::is_control) {
        return Err(fail(KeyLineProblem::ControlCharacter));
    }
    let entry = entry.trim();
    let mut fields = entry.splitn(3, ' ');
    let key_type = fields.next().unwrap_or_default();
    if !KEY_TYPES.contains(&key_type) {
        return Err(fail(KeyLineProblem::UnknownType {
            found: key_type.chars().take(40).collect(),
        }));
    }
    let blob = fields.next().unwrap_or_default();
    if blob.is_empty() {
        return Err(fail(KeyLineProblem::MissingBlob));
    }
    let decoded = STANDARD
        .decode(blob)
        .map_err(|_| fail(KeyLineProblem::NotBase64))?;
    if embedded_type(&decoded) != Some(key_type.as_bytes()) {
        return Err(fail(KeyLineProblem::TypeMismatch {
            declared: key_type.to_owned(),
        }));
    }
    let line = match fields.next().map(str::trim) {
        Some(comment) if !comment.is_empty() => format!("{key_type} {blob} {comment}"),
        _ => format!("{key_type} {blob}"),
    };
    Ok(KeyLine {
        key_type: key_type.to_owned(),
        line,
    })
}

/// The key type a public key blob starts with (an SSH `string`: a big-endian u32 length, then
/// the bytes).
fn embedded_type(blob: &[u8]) -> Option<&[u8]> {
    let length = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?);
    blob.get(4..4 + usize::try_from(length).ok()?)
}

/// Checks every entry: the valid lines in order, blank entries dropped; or the first problem.
pub fn parse_keys(entries: &[String]) -> Result<Vec<KeyLine>, SshKeyError> {
    entries
        .iter()
        .enumerate()
        .filter(|(_, entry)| !entry.trim().is_empty())
        .map(|(index, entry)| parse_key_line(index, entry))
        .collect()
}

/// The bytes of `authorized_keys` for `keys`: the header, then one key a line. Empty when there
/// are no keys (no keys means no file).
pub fn authorized_keys_content(keys: &[KeyLine]) -> Vec<u8> {
    if keys.is_empty() {
        return Vec::new();
    }
    let mut content = format!("{MANAGED_HEADER}\n");
    for key in keys {
        content.push_str(&key.line);
        content.push('\n');
    }
    content.into_bytes()
}

/// Whether an existing `authorized_keys` is the agent's: it starts with [`MANAGED_HEADER`], or
/// it is exactly what earlier versions wrote for these keys (the same lines, no header).
pub fn is_managed(existing: &[u8], keys: &[KeyLine]) -> bool {
    let header = format!("{MANAGED_HEADER}\n");
    if existing.starts_with(header.as_bytes()) {
        return true;
    }
    let legacy: Vec<u8> = keys
        .iter()
        .flat_map(|key| key.line.bytes().chain(std::iter::once(b'\n')))
        .collect();
    !legacy.is_empty() && existing == legacy.as_slice()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A well-formed public key line of `key_type` with `body` as key material.
    fn key(key_type: &str, body: &[u8], comment: &str) -> String {
        let mut blob = Vec::new();
        for part in [key_type.as_bytes(), body] {
            blob.extend_from_slice(&u32::try_from(part.len()).unwrap().to_be_bytes());
            blob.extend_from_slice(part);
        }
        format!("{key_type} {} {comment}", STANDARD.encode(blob))
            .trim_end()
            .to_owned()
    }

    /// What `ssh-keygen -t ed25519` printed for a throwaway key.
    const REAL_ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIlBu026x3m/xbcsBNsGn9n/rFgdb73UvKqITVh8KdFE alice@laptop";
    /// And `ssh-keygen -t ecdsa` (its blob ends in padding).
    const REAL_ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBG7HA/oOJNUvVwjm0UJiFmDNTanp9ZdD2L74RDJ1N4wTWviQ/eS4eS7ROhn25ssj3Pc59W7fdciuQFRGHqmUVGg= bob@example";

    #[test]
    fn real_keys_of_every_type_are_accepted() {
        for real in [REAL_ED25519, REAL_ECDSA] {
            assert_eq!(parse_key_line(0, real).unwrap().line, real);
        }
        for key_type in KEY_TYPES {
            let line = key(key_type, &[7; 32], "bob@example");
            let parsed = parse_key_line(0, &line).unwrap();
            assert_eq!(parsed.key_type, *key_type);
            assert_eq!(parsed.line, line);
        }
    }

    #[test]
    fn blanks_around_and_between_are_normalised() {
        let line = key("ssh-ed25519", &[1; 32], "");
        let parsed = parse_key_line(0, &format!("  {line}   carol  at home ")).unwrap();
        assert_eq!(parsed.line, format!("{line} carol  at home"));
        assert_eq!(parse_key_line(0, &line).unwrap().line, line);
    }

    #[test]
    fn refusals_name_the_entry_and_the_problem() {
        let good = key("ssh-ed25519", &[1; 32], "a@b");
        let cases = [
            (
                format!("{good}\ncommand=\"sh\" {good}"),
                KeyLineProblem::ControlCharacter,
            ),
            (format!("{good}\r"), KeyLineProblem::ControlCharacter),
            (format!("{good}\0"), KeyLineProblem::ControlCharacter),
            (
                format!("command=\"sh\" {good}"),
                KeyLineProblem::UnknownType {
                    found: "command=\"sh\"".into(),
                },
            ),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
                KeyLineProblem::UnknownType {
                    found: "-----BEGIN".into(),
                },
            ),
            ("ssh-ed25519".into(), KeyLineProblem::MissingBlob),
            ("ssh-ed25519 not*base64".into(), KeyLineProblem::NotBase64),
            (
                key("ssh-rsa", &[1; 32], "").replacen("ssh-rsa", "ssh-ed25519", 1),
                KeyLineProblem::TypeMismatch {
                    declared: "ssh-ed25519".into(),
                },
            ),
            (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA".into(),
                KeyLineProblem::NotBase64,
            ),
            (
                "ssh-ed25519 AAAA".into(),
                KeyLineProblem::TypeMismatch {
                    declared: "ssh-ed25519".into(),
                },
            ),
        ];
        for (entry, problem) in cases {
            let error = parse_key_line(3, &entry).unwrap_err();
            assert_eq!(error, SshKeyError { index: 3, problem }, "{entry:?}");
            assert!(error.to_string().starts_with("sshKeys[3]: "), "{error}");
        }
    }

    #[test]
    fn parse_keys_drops_blank_entries_and_reports_the_first_bad_one() {
        let a = key("ssh-ed25519", &[1; 32], "a");
        let b = key("ssh-rsa", &[2; 64], "b");
        let parsed = parse_keys(&[a.clone(), "  ".into(), b.clone()]).unwrap();
        let lines: Vec<_> = parsed.iter().map(|k| k.line.as_str()).collect();
        assert_eq!(lines, [a.as_str(), b.as_str()]);
        let error = parse_keys(&[a, "x y".into(), "z".into()]).unwrap_err();
        assert_eq!(error.index, 1);
    }

    #[test]
    fn the_file_carries_the_header_and_is_recognised_as_managed() {
        let keys = parse_keys(&[key("ssh-ed25519", &[1; 32], "a")]).unwrap();
        let content = authorized_keys_content(&keys);
        let text = String::from_utf8(content.clone()).unwrap();
        assert_eq!(text, format!("{MANAGED_HEADER}\n{}\n", keys[0].line));
        assert!(is_managed(&content, &keys));
        assert!(is_managed(&content, &[]), "the header alone marks it");
        // What earlier versions wrote: the same lines without the header.
        let legacy = format!("{}\n", keys[0].line);
        assert!(is_managed(legacy.as_bytes(), &keys));
        assert!(!is_managed(legacy.as_bytes(), &[]));
        assert!(!is_managed(b"ssh-ed25519 AAAA hand-made\n", &keys));
        assert!(authorized_keys_content(&[]).is_empty());
    }

    proptest! {
        /// Whatever is accepted is one line starting with a known type: one entry never
        /// becomes two keys or an option line in `authorized_keys`.
        #[test]
        fn accepted_entries_are_single_lines(entry in "\\PC{0,80}", body in proptest::collection::vec(any::<u8>(), 0..64), comment in "[ -~]{0,20}") {
            for candidate in [entry.clone(), key("ssh-ed25519", &body, &comment)] {
                if let Ok(parsed) = parse_key_line(0, &candidate) {
                    prop_assert!(!parsed.line.contains(['\n', '\r', '\0']));
                    prop_assert!(KEY_TYPES.contains(&parsed.key_type.as_str()));
                    let prefix = format!("{} ", parsed.key_type);
                    prop_assert!(parsed.line.starts_with(&prefix));
                }
            }
        }

        /// Any byte sequence with a control character is refused.
        #[test]
        fn control_characters_are_always_refused(prefix in "[ -~]{0,20}", control in 0u8..0x20, suffix in "[ -~]{0,20}") {
            let entry = format!("{prefix}{}{suffix}", control as char);
            prop_assert!(parse_key_line(0, &entry).is_err());
        }
    }
}
