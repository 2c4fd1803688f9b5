//! `edgebridge onenet …`: helpers for OneNET users. `token` prints the
//! password OneNET expects, for debugging with MQTT.fx or mosquitto_pub.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::bridge::onenet::token::{self, AccessKey};
use crate::config::{Config, OneNetConfig, Secret, SignMethod};

#[derive(Subcommand, Debug)]
pub enum OnenetCommand {
    /// Print a device token (the MQTT password OneNET expects). Parameters
    /// not given are taken from the config's OneNET bridge; the key may come
    /// from $ONENET_KEY so it stays out of the shell history.
    Token(TokenArgs),
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Product id (产品ID).
    #[arg(long)]
    pub product_id: Option<String>,
    /// Device name.
    #[arg(long)]
    pub device: Option<String>,
    /// Access key (base64). Default: $ONENET_KEY, then the config.
    #[arg(long)]
    pub key: Option<String>,
    /// Signature method: md5, sha1 or sha256.
    #[arg(long, value_parser = parse_method)]
    pub method: Option<SignMethod>,
    /// Lifetime from now, e.g. 1h or 30d. Default: the bridge's `token_ttl`
    /// (30d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Exact expiry as Unix seconds, instead of --ttl.
    #[arg(long, conflicts_with = "ttl")]
    pub et: Option<u64>,
    /// Sign for the whole product (`res=products/<id>`) with a product key.
    #[arg(long)]
    pub product_key: bool,
    /// Which bridge of the config to read, when it has several.
    #[arg(long)]
    pub bridge: Option<String>,
}

fn parse_method(s: &str) -> Result<SignMethod, String> {
    SignMethod::parse(s).ok_or_else(|| format!("`{s}`: use md5, sha1 or sha256"))
}

pub fn run(config_path: &Path, cmd: OnenetCommand) -> anyhow::Result<()> {
    match cmd {
        OnenetCommand::Token(args) => {
            let env_key = std::env::var("ONENET_KEY").ok().filter(|k| !k.is_empty());
            let t = token_for(config_path, args, env_key, SystemTime::now())?;
            println!("{t}");
            Ok(())
        }
    }
}

/// The token for `args`, filling gaps from the config at `config_path`.
pub fn token_for(
    config_path: &Path,
    args: TokenArgs,
    env_key: Option<String>,
    now: SystemTime,
) -> anyhow::Result<String> {
    let key = args.key.clone().or(env_key);
    let complete =
        args.product_id.is_some() && key.is_some() && (args.device.is_some() || args.product_key);
    let from_config = if complete {
        None
    } else {
        Some(onenet_block(config_path, args.bridge.as_deref())?)
    };
    let pick = |given: Option<String>, f: fn(&OneNetConfig) -> String, what: &str| {
        given
            .or_else(|| from_config.as_ref().map(f))
            .with_context(|| format!("missing {what}"))
    };
    let product_id = pick(args.product_id, |o| o.product_id.clone(), "--product-id")?;
    let key = pick(key, |o| o.access_key.expose().to_string(), "--key")?;
    let key = AccessKey::from_base64(&Secret::new(key))?;
    let method = args
        .method
        .or(from_config.as_ref().map(|o| o.method))
        .unwrap_or_default();
    let res = if args.product_key {
        token::product_resource(&product_id)
    } else {
        let device = pick(args.device, |o| o.device_name.clone(), "--device")?;
        token::device_resource(&product_id, &device)
    };
    let et = match args.et {
        Some(et) => et,
        None => {
            let ttl = args
                .ttl
                .or(from_config.as_ref().map(|o| o.token_ttl))
                .unwrap_or(Duration::from_secs(30 * 86400));
            token::expiry(now, ttl)
        }
    };
    Ok(token::token(&key, method, &res, et))
}

fn onenet_block(path: &Path, bridge: Option<&str>) -> anyhow::Result<OneNetConfig> {
    let config = Config::load(path).map_err(|e| {
        anyhow::anyhow!("{e}\n(give --product-id, --device and --key to skip the config)")
    })?;
    let mut found = config
        .bridges
        .iter()
        .filter(|b| bridge.is_none_or(|n| b.name == n))
        .filter_map(|b| b.onenet.clone().map(|o| (b.name.clone(), o)));
    match (found.next(), found.next()) {
        (Some((_, o)), None) => Ok(o),
        (None, _) => match bridge {
            Some(n) => bail!("{}: no OneNET bridge named `{n}`", path.display()),
            None => bail!("{} has no bridge with `onenet:`", path.display()),
        },
        (Some((a, _)), Some((b, _))) => {
            bail!(
                "{} has several OneNET bridges (`{a}`, `{b}`…); choose one with --bridge",
                path.display()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const KEY: &str = "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=";

    fn args() -> TokenArgs {
        TokenArgs {
            product_id: Some("123123".into()),
            device: Some("mydev".into()),
            key: None,
            method: Some(SignMethod::Sha1),
            ttl: None,
            et: Some(1537255523),
            product_key: false,
            bridge: None,
        }
    }

    #[test]
    fn token_from_arguments_matches_the_reference() {
        let t = token_for(
            Path::new("/nonexistent.yaml"),
            args(),
            Some(KEY.into()),
            SystemTime::now(),
        )
        .unwrap();
        assert!(
            t.ends_with("&method=sha1&sign=p2Bv5QYrZolQCtt68923gtxRCVk%3D"),
            "{t}"
        );
        let mut a = args();
        a.product_key = true;
        a.device = None;
        let t = token_for(
            Path::new("/nonexistent.yaml"),
            a,
            Some(KEY.into()),
            SystemTime::now(),
        )
        .unwrap();
        assert!(t.contains("res=products%2F123123&"), "{t}");
        assert!(t.ends_with("sign=lsaPSiiGvEFFjXu5WU7a6IkScqE%3D"), "{t}");
    }

    #[test]
    fn missing_parameters_come_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            format!(
                "gateway: {{ id: gw }}\nbridges:\n  - name: one\n    onenet:\n      \
                 product_id: \"123123\"\n      device_name: mydev\n      access_key: \"{KEY}\"\n      \
                 method: md5\n      token_ttl: 1h\n"
            ),
        )
        .unwrap();
        let a = TokenArgs {
            product_id: None,
            device: None,
            key: None,
            method: None,
            ttl: None,
            et: None,
            product_key: false,
            bridge: None,
        };
        let now = UNIX_EPOCH + Duration::from_secs(1537251923);
        let t = token_for(&path, a, None, now).unwrap();
        assert!(t.contains("&et=1537255523&method=md5&"), "{t}");
        assert!(t.ends_with("sign=XV29qkZOl7StAMRW9zVvaQ%3D%3D"), "{t}");
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let mut a = args();
        a.key = Some("not base64!".into());
        let e = token_for(Path::new("/x"), a, None, SystemTime::now()).unwrap_err();
        assert!(e.to_string().contains("not valid base64"), "{e}");
        let mut a = args();
        a.product_id = None;
        let e = token_for(
            Path::new("/nonexistent.yaml"),
            a,
            Some(KEY.into()),
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("give --product-id"), "{e}");
    }
}
