//! `apphttp`: a small HTTP/1.1 server for the example apps that run inside cloudlet
//! guest VMs. The apps are linked statically and must stay small, so it is built on
//! std threads and two small parsers: `httparse` for requests and `serde_json` for
//! the JSON the apps answer with; no async runtime.
//!
//! - [`request`]: reads requests with size limits; every malformed input maps to an
//!   error carrying the status to answer with (400, 411, 413, 414, 431, 501, 505).
//! - [`response`]: responses and their serialization.
//! - [`server`]: thread-per-connection server with keep-alive.
//! - [`url`]: percent-decoding of paths and query strings.
//!
//! Tests talk to the apps with `cloudlet-testkit`'s client.

pub mod request;
pub mod response;
pub mod server;
pub mod url;

pub use request::{BodyFraming, Head, Limits, ReadRequestError, Request, Version};
pub use response::{Body, Response};
pub use server::{serve, Handler, ServerConfig};

/// Lowercase hex encoding.
pub fn hex(data: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(data.len() * 2);
    for &b in data {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Parses `--name value` / `--name=value` command-line options: returns the value of
/// `name` if `arg` is that option, taking the next argument from `rest` when needed.
/// `Err` if the option is present but its value is missing.
pub fn option_value(
    arg: &str,
    name: &str,
    rest: &mut impl Iterator<Item = String>,
) -> Result<Option<String>, String> {
    if arg == name {
        return rest
            .next()
            .map(Some)
            .ok_or_else(|| format!("Option {name} needs a value"));
    }
    Ok(arg
        .strip_prefix(name)
        .and_then(|v| v.strip_prefix('='))
        .map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_encodes() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }

    #[test]
    fn option_values() {
        let mut rest = vec!["8080".to_string()].into_iter();
        assert_eq!(
            option_value("--port", "--port", &mut rest),
            Ok(Some("8080".into()))
        );
        assert_eq!(
            option_value("--port=1", "--port", &mut rest),
            Ok(Some("1".into()))
        );
        assert_eq!(option_value("--portx", "--port", &mut rest), Ok(None));
        assert!(option_value("--port", "--port", &mut rest).is_err());
    }
}
