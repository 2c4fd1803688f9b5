//! OneNET's device token (the MQTT password), version `2018-10-31`.
//!
//! `sign = base64(HMAC_method(base64decode(access_key), et\nmethod\nres\nversion))`
//! and the token is
//! `version=2018-10-31&res=<enc(res)>&et=<et>&method=<method>&sign=<enc(sign)>`,
//! where `enc` percent-encodes exactly the characters OneNET lists. The
//! string to sign uses the raw values, not the encoded ones.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};

use crate::config::{Secret, SignMethod};

/// The only token version OneNET knows.
pub const TOKEN_VERSION: &str = "2018-10-31";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the OneNET access key is empty")]
    EmptyKey,
    #[error(
        "the OneNET access key is not valid base64; copy it unchanged from the \
         device's (or product's) page in the OneNET console"
    )]
    KeyNotBase64,
    #[error("not a OneNET token: {0}")]
    Malformed(String),
}

/// A decoded access key. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct AccessKey(Vec<u8>);

impl AccessKey {
    /// Decodes the key as shown in the OneNET console (standard base64).
    pub fn from_base64(key: &Secret) -> Result<AccessKey, TokenError> {
        let text = key.expose().trim();
        if text.is_empty() {
            return Err(TokenError::EmptyKey);
        }
        STANDARD
            .decode(text)
            .map(AccessKey)
            .map_err(|_| TokenError::KeyNotBase64)
    }
}

impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessKey(<redacted>)")
    }
}

impl SignMethod {
    /// The name used in the token (`md5`, `sha1`, `sha256`).
    pub fn as_str(self) -> &'static str {
        match self {
            SignMethod::Md5 => "md5",
            SignMethod::Sha1 => "sha1",
            SignMethod::Sha256 => "sha256",
        }
    }

    pub fn parse(s: &str) -> Option<SignMethod> {
        match s {
            "md5" => Some(SignMethod::Md5),
            "sha1" => Some(SignMethod::Sha1),
            "sha256" => Some(SignMethod::Sha256),
            _ => None,
        }
    }
}

/// `res` for a device-level key: `products/{pid}/devices/{device}`.
pub fn device_resource(product_id: &str, device_name: &str) -> String {
    format!("products/{product_id}/devices/{device_name}")
}

/// `res` for a product-level key: `products/{pid}`.
pub fn product_resource(product_id: &str) -> String {
    format!("products/{product_id}")
}

/// Unix seconds `ttl` after `now`: the token's `et`.
pub fn expiry(now: SystemTime, ttl: Duration) -> u64 {
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    now.saturating_add(ttl.as_secs())
}

/// The base64 signature of `(et, method, res)` with `key`.
pub fn sign(key: &AccessKey, method: SignMethod, res: &str, et: u64) -> String {
    let msg = format!("{et}\n{}\n{res}\n{TOKEN_VERSION}", method.as_str());
    // HMAC takes keys of any length, so `new_from_slice` cannot fail.
    let mac = match method {
        SignMethod::Md5 => hmac_bytes::<Hmac<md5::Md5>>(&key.0, msg.as_bytes()),
        SignMethod::Sha1 => hmac_bytes::<Hmac<sha1::Sha1>>(&key.0, msg.as_bytes()),
        SignMethod::Sha256 => hmac_bytes::<Hmac<sha2::Sha256>>(&key.0, msg.as_bytes()),
    };
    STANDARD.encode(mac)
}

fn hmac_bytes<M: Mac + hmac::digest::KeyInit>(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key).unwrap_or_else(|_| {
        // Invariant: HMAC accepts every key length (longer keys are hashed).
        unreachable!("HMAC accepts keys of any length")
    });
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

/// The complete token (MQTT password) for `res`, valid until `et`.
pub fn token(key: &AccessKey, method: SignMethod, res: &str, et: u64) -> String {
    let sign = sign(key, method, res, et);
    format!(
        "version={TOKEN_VERSION}&res={}&et={et}&method={}&sign={}",
        encode(res),
        method.as_str(),
        encode(&sign)
    )
}

/// Percent-encodes exactly the characters OneNET's token spec lists
/// (`+ space / ? % # & =`), with uppercase hex; everything else is kept.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '+' => out.push_str("%2B"),
            ' ' => out.push_str("%20"),
            '/' => out.push_str("%2F"),
            '?' => out.push_str("%3F"),
            '%' => out.push_str("%25"),
            '#' => out.push_str("%23"),
            '&' => out.push_str("%26"),
            '=' => out.push_str("%3D"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses percent-encoding (`%XX`, any case).
pub fn decode(s: &str) -> Result<String, TokenError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| TokenError::Malformed(format!("bad escape at byte {i}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TokenError::Malformed("not UTF-8".into()))
}

/// A token taken apart, values decoded. Parameters may come in any order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken {
    pub version: String,
    pub res: String,
    pub et: u64,
    pub method: SignMethod,
    pub sign: String,
}

impl ParsedToken {
    pub fn parse(token: &str) -> Result<ParsedToken, TokenError> {
        let (mut version, mut res, mut et, mut method, mut sign) = (None, None, None, None, None);
        for pair in token.split('&') {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| TokenError::Malformed(format!("`{pair}` is not key=value")))?;
            let v = decode(v)?;
            match k {
                "version" => version = Some(v),
                "res" => res = Some(v),
                "et" => {
                    et = Some(v.parse::<u64>().map_err(|_| {
                        TokenError::Malformed(format!("et `{v}` is not Unix seconds"))
                    })?)
                }
                "method" => {
                    method =
                        Some(SignMethod::parse(&v).ok_or_else(|| {
                            TokenError::Malformed(format!("unknown method `{v}`"))
                        })?)
                }
                "sign" => sign = Some(v),
                other => return Err(TokenError::Malformed(format!("unknown key `{other}`"))),
            }
        }
        let missing = |k: &str| TokenError::Malformed(format!("`{k}` is missing"));
        Ok(ParsedToken {
            version: version.ok_or_else(|| missing("version"))?,
            res: res.ok_or_else(|| missing("res"))?,
            et: et.ok_or_else(|| missing("et"))?,
            method: method.ok_or_else(|| missing("method"))?,
            sign: sign.ok_or_else(|| missing("sign"))?,
        })
    }

    /// Whether `key` produced this signature.
    pub fn verify(&self, key: &AccessKey) -> bool {
        self.version == TOKEN_VERSION && sign(key, self.method, &self.res, self.et) == self.sign
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The reference's test vector (docs' sample key).
    const KEY: &str = "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=";
    const ET: u64 = 1537255523;

    fn key() -> AccessKey {
        AccessKey::from_base64(&Secret::new(KEY)).unwrap()
    }

    #[test]
    fn test_vector_all_methods() {
        let res = device_resource("123123", "mydev");
        assert_eq!(
            sign(&key(), SignMethod::Md5, &res, ET),
            "XV29qkZOl7StAMRW9zVvaQ=="
        );
        assert_eq!(
            sign(&key(), SignMethod::Sha1, &res, ET),
            "p2Bv5QYrZolQCtt68923gtxRCVk="
        );
        assert_eq!(
            sign(&key(), SignMethod::Sha256, &res, ET),
            "dL9mxHdJXyd2TZcmTna60TMUei2dYU5W6iOow7fH/7w="
        );
        assert_eq!(
            sign(&key(), SignMethod::Sha1, &product_resource("123123"), ET),
            "lsaPSiiGvEFFjXu5WU7a6IkScqE="
        );
    }

    #[test]
    fn full_tokens_are_encoded_exactly() {
        let res = device_resource("123123", "mydev");
        assert_eq!(
            token(&key(), SignMethod::Sha1, &res, ET),
            "version=2018-10-31&res=products%2F123123%2Fdevices%2Fmydev&et=1537255523\
             &method=sha1&sign=p2Bv5QYrZolQCtt68923gtxRCVk%3D"
        );
        assert_eq!(
            token(&key(), SignMethod::Sha256, &res, ET),
            "version=2018-10-31&res=products%2F123123%2Fdevices%2Fmydev&et=1537255523\
             &method=sha256&sign=dL9mxHdJXyd2TZcmTna60TMUei2dYU5W6iOow7fH%2F7w%3D"
        );
        assert_eq!(
            token(&key(), SignMethod::Md5, &res, ET),
            "version=2018-10-31&res=products%2F123123%2Fdevices%2Fmydev&et=1537255523\
             &method=md5&sign=XV29qkZOl7StAMRW9zVvaQ%3D%3D"
        );
    }

    #[test]
    fn encode_touches_only_listed_characters() {
        assert_eq!(
            encode("a+b c/d?e%f#g&h=i"),
            "a%2Bb%20c%2Fd%3Fe%25f%23g%26h%3Di"
        );
        assert_eq!(encode("Ab9-_.~"), "Ab9-_.~");
        assert_eq!(
            decode(&encode("a+b c/d?e%f#g&h=i")).unwrap(),
            "a+b c/d?e%f#g&h=i"
        );
    }

    #[test]
    fn parse_and_verify_round_trip() {
        let res = device_resource("123123", "mydev");
        for m in [SignMethod::Md5, SignMethod::Sha1, SignMethod::Sha256] {
            let t = ParsedToken::parse(&token(&key(), m, &res, ET)).unwrap();
            assert_eq!((t.res.as_str(), t.et, t.method), (res.as_str(), ET, m));
            assert!(t.verify(&key()));
            let other = AccessKey::from_base64(&Secret::new("AAAA")).unwrap();
            assert!(!t.verify(&other));
        }
        assert!(ParsedToken::parse("version=2018-10-31&res=x").is_err());
        assert!(ParsedToken::parse("garbage").is_err());
    }

    #[test]
    fn bad_keys_are_clear_errors_and_never_shown() {
        assert_eq!(
            AccessKey::from_base64(&Secret::new("")).unwrap_err(),
            TokenError::EmptyKey
        );
        assert_eq!(
            AccessKey::from_base64(&Secret::new("not base64!")).unwrap_err(),
            TokenError::KeyNotBase64
        );
        assert_eq!(format!("{:?}", key()), "AccessKey(<redacted>)");
    }

    #[test]
    fn expiry_adds_ttl_in_seconds() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(
            expiry(now, Duration::from_secs(30 * 86400)),
            1_000 + 2_592_000
        );
    }
}
