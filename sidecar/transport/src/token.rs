//! The pre-shared token of the TCP control plane: read from a file only its owner can
//! read (`--token-file`) or from the environment (`CUTLINE_TOKEN`), never from argv,
//! where every user of the machine could read it in the process table.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::flags;

/// Longest token file read: a token is short; this keeps a wrong path (a device, a log)
/// from being read whole.
pub const MAX_TOKEN_FILE: u64 = 64 * 1024;

/// Errors of getting the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Neither a token file nor the environment variable was given.
    #[error("TCP needs the pre-shared token: {} PATH (or {}) or {}", flags::TOKEN_FILE.flag, flags::TOKEN_FILE.env, flags::TOKEN_ENV)]
    Missing,
    /// The token file cannot be read.
    #[error("cannot read the token file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The token file may be read (or written) by users other than its owner.
    #[error("the token file {path} has mode {mode:04o}: group or others may access it (run `chmod 600 {path}`)")]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token file is larger than [`MAX_TOKEN_FILE`].
    #[error("the token file {path} is larger than {MAX_TOKEN_FILE} bytes: not a token")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The token is not UTF-8.
    #[error("the token in {from} is not UTF-8")]
    NotUtf8 {
        /// Where it came from (a path or the variable's name).
        from: String,
    },
    /// The token is empty (after one trailing newline is removed).
    #[error("the token in {from} is empty")]
    Empty {
        /// Where it came from (a path or the variable's name).
        from: String,
    },
}

/// A pre-shared token. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token from its text, `from` naming where it came from (for errors): one
    /// trailing newline (`\n` or `\r\n`) is removed; an empty token is refused.
    pub fn parse(text: String, from: &str) -> Result<Token, TokenError> {
        let mut text = text;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        if text.is_empty() {
            return Err(TokenError::Empty { from: from.to_owned() });
        }
        Ok(Token(text))
    }

    /// The token in `path`, which must not be accessible by group or others.
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let read = |source| TokenError::Read { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(read)?;
        // The mode of the file opened, not of whatever the path names a moment later.
        let mode = file.metadata().map_err(read)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Exposed { path: path.to_owned(), mode });
        }
        let mut bytes = Vec::new();
        file.take(MAX_TOKEN_FILE + 1).read_to_end(&mut bytes).map_err(read)?;
        if bytes.len() as u64 > MAX_TOKEN_FILE {
            return Err(TokenError::TooLarge { path: path.to_owned() });
        }
        let from = path.display().to_string();
        let text = String::from_utf8(bytes).map_err(|_| TokenError::NotUtf8 { from: from.clone() })?;
        Token::parse(text, &from)
    }

    /// The token from `file` when given, else from the environment variable
    /// [`flags::TOKEN_ENV`]; [`TokenError::Missing`] when neither is there.
    pub fn load(file: Option<&Path>) -> Result<Token, TokenError> {
        Token::load_from(file, std::env::var_os(flags::TOKEN_ENV))
    }

    /// [`Token::load`] with the environment variable's value given.
    fn load_from(file: Option<&Path>, env: Option<std::ffi::OsString>) -> Result<Token, TokenError> {
        match (file, env) {
            (Some(path), _) => Token::from_file(path),
            (None, Some(value)) => {
                let from = flags::TOKEN_ENV;
                let text = value.into_string().map_err(|_| TokenError::NotUtf8 { from: from.to_owned() })?;
                Token::parse(text, from)
            }
            (None, None) => Err(TokenError::Missing),
        }
    }

    /// The token's text (to send it).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this token, compared in constant time.
    pub fn matches(&self, given: &str) -> bool {
        cutline_proto::same_token(given, &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, text: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn one_trailing_newline_is_removed_and_empty_tokens_refused() {
        let t = |s: &str| Token::parse(s.to_owned(), "test").map(|t| t.expose().to_owned());
        assert_eq!(t("abc\n").expect("token"), "abc");
        assert_eq!(t("abc\r\n").expect("token"), "abc");
        assert_eq!(t("abc\n\n").expect("token"), "abc\n");
        assert_eq!(t("abc").expect("token"), "abc");
        assert!(matches!(t(""), Err(TokenError::Empty { .. })));
        assert!(matches!(t("\n"), Err(TokenError::Empty { .. })));
    }

    #[test]
    fn a_token_file_readable_by_others_is_refused_naming_path_and_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = file(dir.path(), "ok", b"s3cret\n", 0o600);
        assert_eq!(Token::from_file(&ok).expect("token").expose(), "s3cret");
        for mode in [0o640, 0o604, 0o644, 0o620] {
            let p = file(dir.path(), &format!("m{mode:o}"), b"s3cret\n", mode);
            let e = Token::from_file(&p).expect_err("exposed");
            assert!(matches!(e, TokenError::Exposed { mode: m, .. } if m == mode), "{e:?}");
            let text = e.to_string();
            assert!(text.contains(&p.display().to_string()) && text.contains(&format!("{mode:04o}")), "{text}");
        }
        let empty = file(dir.path(), "empty", b"\n", 0o400);
        assert!(matches!(Token::from_file(&empty), Err(TokenError::Empty { .. })));
        let big = file(dir.path(), "big", &vec![b'x'; MAX_TOKEN_FILE as usize + 1], 0o600);
        assert!(matches!(Token::from_file(&big), Err(TokenError::TooLarge { .. })));
        let missing = dir.path().join("missing");
        assert!(matches!(Token::from_file(&missing), Err(TokenError::Read { .. })));
    }

    #[test]
    fn the_file_wins_over_the_environment_and_one_is_needed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = file(dir.path(), "t", b"from-file", 0o600);
        let token = Token::load_from(Some(&f), Some("from-env".into())).expect("token");
        assert_eq!(token.expose(), "from-file");
        assert_eq!(Token::load_from(None, Some("from-env\n".into())).expect("token").expose(), "from-env");
        assert!(matches!(Token::load_from(None, Some("".into())), Err(TokenError::Empty { .. })));
        let missing = Token::load_from(None, None).expect_err("missing");
        assert!(missing.to_string().contains("--token-file"), "{missing}");
        assert!(missing.to_string().contains("CUTLINE_TOKEN"), "{missing}");
    }

    #[test]
    fn tokens_match_only_themselves_and_never_show_in_debug() {
        let t = Token::parse("s3cret".into(), "test").expect("token");
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre"));
        assert!(!t.matches("s3cret\0"));
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
