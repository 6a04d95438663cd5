//! Who husk is at a registry: `--creds USER:PASS` if given, else the
//! registry's entry in Docker's `config.json` (`$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json`), else anonymous. An `auths` entry with a
//! base64 `auth` (or `username` and `password`) is used; credential helpers
//! (`credHelpers`, `credsStore`) and identity tokens are not run or used:
//! a `credHelpers` entry for the registry is refused with a message saying
//! what to do instead, and a `credsStore` is named in the error when the
//! registry then asks for a login.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::RegistryError;

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Parses `USER:PASS` (the password may hold `:`).
    pub fn parse(creds: &str) -> Result<Credentials, RegistryError> {
        match creds.split_once(':') {
            Some((user, pass)) if !user.is_empty() => Ok(Credentials {
                username: user.to_string(),
                password: pass.to_string(),
            }),
            _ => Err(RegistryError::BadCreds),
        }
    }
}

/// How husk logs in to a registry, and where that came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// No credentials. `creds_store` names a Docker credential store that
    /// may hold some but that husk does not query.
    Anonymous {
        /// `credsStore` of the Docker config, if any.
        creds_store: Option<String>,
    },
    /// A user and password, from `source` (`--creds` or a config file).
    Basic {
        /// The credentials.
        credentials: Credentials,
        /// Where they came from, for messages.
        source: String,
    },
}

/// The Docker client configuration file: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(Path::new(&dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| Path::new(&h).join(".docker/config.json"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The login for `registry` (as written in the reference, e.g.
/// `127.0.0.1:5000` or `docker.io`): `creds` if given, else the Docker
/// config at `config` (a missing file is no credentials), else anonymous.
pub fn login_for(
    registry: &str,
    creds: Option<&Credentials>,
    config: Option<&Path>,
) -> Result<Login, RegistryError> {
    if let Some(c) = creds {
        return Ok(Login::Basic {
            credentials: c.clone(),
            source: "--creds".into(),
        });
    }
    let Some(path) = config else {
        return Ok(Login::Anonymous { creds_store: None });
    };
    let raw = match std::fs::read(path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Login::Anonymous { creds_store: None })
        }
        Err(source) => {
            return Err(RegistryError::DockerConfigRead {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let config: DockerConfig =
        serde_json::from_slice(&raw).map_err(|source| RegistryError::DockerConfigParse {
            path: path.to_path_buf(),
            source,
        })?;
    let keys = config_keys(registry);
    if let Some(helper) = keys.iter().find_map(|k| config.cred_helpers.get(k)) {
        return Err(RegistryError::CredentialHelper {
            registry: registry.to_string(),
            helper: helper.clone(),
            path: path.to_path_buf(),
        });
    }
    let source = path.display().to_string();
    let Some(entry) = keys.iter().find_map(|k| config.auths.get(k)) else {
        return Ok(Login::Anonymous {
            creds_store: config.creds_store,
        });
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let bad = |reason: &str| RegistryError::DockerConfigAuth {
            registry: registry.to_string(),
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad("its \"auth\" is not base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad("its \"auth\" is not UTF-8"))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| bad("its \"auth\" is not base64 of USER:PASSWORD"))?;
        return Ok(Login::Basic {
            credentials: Credentials {
                username: user.to_string(),
                password: pass.to_string(),
            },
            source,
        });
    }
    if let (Some(user), Some(pass)) = (&entry.username, &entry.password) {
        return Ok(Login::Basic {
            credentials: Credentials {
                username: user.clone(),
                password: pass.clone(),
            },
            source,
        });
    }
    if entry.identitytoken.is_some() {
        return Err(RegistryError::DockerConfigAuth {
            registry: registry.to_string(),
            path: path.to_path_buf(),
            reason: "it holds an identity token, which husk cannot use; pass --creds USER:PASS"
                .to_string(),
        });
    }
    // An empty entry: Docker writes those when the secret is in credsStore.
    Ok(Login::Anonymous {
        creds_store: config.creds_store,
    })
}

/// The keys a registry may have in `auths`/`credHelpers`: as written, with
/// a scheme and a `/v1/` or `/v2/` path (what `docker login` writes for
/// Docker Hub: `https://index.docker.io/v1/`).
fn config_keys(registry: &str) -> Vec<String> {
    let mut hosts = vec![registry.to_string()];
    if registry == "docker.io" || registry == "index.docker.io" {
        hosts = vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
            "registry-1.docker.io".into(),
        ];
    }
    let mut keys = Vec::new();
    for h in hosts {
        keys.push(h.clone());
        for scheme in ["https://", "http://"] {
            for suffix in ["", "/", "/v1/", "/v2/"] {
                keys.push(format!("{scheme}{h}{suffix}"));
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), json).unwrap();
        f
    }

    fn basic(user: &str, pass: &str) -> Credentials {
        Credentials {
            username: user.into(),
            password: pass.into(),
        }
    }

    #[test]
    fn creds_flag_wins_and_parses_user_colon_password() {
        assert_eq!(
            Credentials::parse("me:pa:ss").unwrap(),
            basic("me", "pa:ss")
        );
        assert!(matches!(
            Credentials::parse("nocolon"),
            Err(RegistryError::BadCreds)
        ));
        assert!(Credentials::parse(":pass").is_err());
        let f = config(r#"{"auths":{"reg:5000":{"auth":"dTpw"}}}"#);
        let c = basic("flag", "x");
        assert_eq!(
            login_for("reg:5000", Some(&c), Some(f.path())).unwrap(),
            Login::Basic {
                credentials: c.clone(),
                source: "--creds".into()
            }
        );
        // The password is never printed.
        assert!(!format!("{c:?}").contains('x'));
    }

    #[test]
    fn auths_entries_by_host_scheme_and_docker_hub_name() {
        // "dTpw" is base64 of "u:p".
        let f = config(
            r#"{"auths":{
                "127.0.0.1:5000":{"auth":"dTpw"},
                "https://reg.example/":{"auth":"dTpw"},
                "https://index.docker.io/v1/":{"username":"hub","password":"secret"},
                "empty.example":{}
            },"credsStore":"desktop"}"#,
        );
        let src = f.path().display().to_string();
        let got = |r: &str| login_for(r, None, Some(f.path())).unwrap();
        let want = Login::Basic {
            credentials: basic("u", "p"),
            source: src.clone(),
        };
        assert_eq!(got("127.0.0.1:5000"), want);
        assert_eq!(got("reg.example"), want);
        assert_eq!(
            got("docker.io"),
            Login::Basic {
                credentials: basic("hub", "secret"),
                source: src,
            }
        );
        let store = Login::Anonymous {
            creds_store: Some("desktop".into()),
        };
        assert_eq!(got("empty.example"), store);
        assert_eq!(got("127.0.0.1:5001"), store);
    }

    #[test]
    fn missing_config_is_anonymous_and_bad_ones_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let none = Login::Anonymous { creds_store: None };
        assert_eq!(
            login_for("r", None, Some(&dir.path().join("config.json"))).unwrap(),
            none
        );
        assert_eq!(login_for("r", None, None).unwrap(), none);
        let f = config("{not json");
        assert!(matches!(
            login_for("r", None, Some(f.path())),
            Err(RegistryError::DockerConfigParse { .. })
        ));
        let f = config(r#"{"auths":{"r":{"auth":"!!!"}}}"#);
        let e = login_for("r", None, Some(f.path())).unwrap_err();
        assert!(e.to_string().contains("not base64"), "{e}");
        let f = config(r#"{"auths":{"r":{"auth":"bm9jb2xvbg=="}}}"#); // "nocolon"
        assert!(login_for("r", None, Some(f.path())).is_err());
        let f = config(r#"{"auths":{"r":{"identitytoken":"t"}}}"#);
        let e = login_for("r", None, Some(f.path())).unwrap_err();
        assert!(e.to_string().contains("identity token"), "{e}");
    }

    #[test]
    fn credential_helpers_are_refused_clearly() {
        let f = config(r#"{"credHelpers":{"gcr.io":"gcloud"},"auths":{"gcr.io":{"auth":"dTpw"}}}"#);
        let e = login_for("gcr.io", None, Some(f.path())).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("docker-credential-gcloud") && msg.contains("--creds"),
            "{msg}"
        );
        // Other registries are unaffected.
        assert_eq!(
            login_for("other.io", None, Some(f.path())).unwrap(),
            Login::Anonymous { creds_store: None }
        );
    }
}
