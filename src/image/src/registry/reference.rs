//! What an IMAGE argument names: a local OCI layout (a path) or an image in
//! a registry (`registry/name:tag`, `name@sha256:...`,
//! `registry/name:tag@sha256:...`), and whether a registry is spoken to
//! over plain HTTP (loopback registries and those the user calls insecure)
//! or HTTPS (all others).

use std::net::IpAddr;
use std::path::Path;

use oci_client::Reference;

use super::RegistryError;

/// Where an IMAGE argument points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A local OCI layout, `PATH[:REF]` (see [`crate::oci::split_image_arg`]).
    Local(String),
    /// An image in a registry.
    Registry(ImageRef),
}

impl ImageSource {
    /// Tells a local layout from a registry reference. A path wins: an
    /// argument that exists on this host (whole, or its part before a `:`,
    /// as `dir:busybox:latest`) or starts with `/`, `./`, `../` or `~` is
    /// local. Anything else must be a valid registry reference.
    pub fn parse(arg: &str) -> Result<ImageSource, RegistryError> {
        let looks_like_path = ["/", "./", "../", "~"].iter().any(|p| arg.starts_with(p))
            || arg == "."
            || arg == ".."
            || Path::new(arg).exists()
            || arg
                .match_indices(':')
                .any(|(i, _)| Path::new(&arg[..i]).exists());
        if looks_like_path {
            return Ok(ImageSource::Local(arg.to_string()));
        }
        ImageRef::parse(arg).map(ImageSource::Registry)
    }
}

/// A parsed registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    /// Parses `[REGISTRY/]NAME[:TAG][@sha256:HEX]`. Without a registry the
    /// name is Docker Hub's (`busybox` is `docker.io/library/busybox`);
    /// without tag or digest the tag is `latest`. Only sha256 digests.
    pub fn parse(arg: &str) -> Result<ImageRef, RegistryError> {
        let inner = Reference::try_from(arg).map_err(|source| RegistryError::BadReference {
            reference: arg.to_string(),
            reason: source.to_string(),
        })?;
        if let Some(d) = inner.digest() {
            crate::oci::digest_hex(d).map_err(|e| RegistryError::BadReference {
                reference: arg.to_string(),
                reason: e.to_string(),
            })?;
        }
        Ok(ImageRef { inner })
    }

    /// The registry as written (`127.0.0.1:5000`, `docker.io`).
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The host:port actually contacted (`index.docker.io` for `docker.io`).
    pub fn registry_address(&self) -> &str {
        self.inner.resolve_registry()
    }

    /// The repository (`library/busybox`).
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The tag, if the reference has one (`latest` when it has neither tag
    /// nor digest).
    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// The pinned digest, if any.
    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// The same repository at `digest`.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            inner: Reference::with_digest(
                self.registry().to_string(),
                self.repository().to_string(),
                digest.to_string(),
            ),
        }
    }

    pub(crate) fn as_oci(&self) -> &Reference {
        &self.inner
    }

    /// Whether the registry is a loopback address or `localhost`.
    pub fn is_loopback(&self) -> bool {
        is_loopback(host_of(self.registry_address()))
    }

    /// Whether this registry is spoken to over plain HTTP: a loopback
    /// address or `localhost` (any port), or a registry named in
    /// `insecure` (`HOST` matches any port of HOST, `HOST:PORT` only that).
    pub fn plain_http(&self, insecure: &[String]) -> bool {
        let address = self.registry_address();
        let host = host_of(address);
        self.is_loopback()
            || insecure
                .iter()
                .any(|i| i == address || (!i.contains(':') && i == host) || i == self.registry())
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

/// `host` of `host`, `host:port`, `[v6]:port`.
fn host_of(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => address,
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn reg(arg: &str) -> ImageRef {
        match ImageSource::parse(arg).unwrap() {
            ImageSource::Registry(r) => r,
            other => panic!("{arg}: {other:?}"),
        }
    }

    #[test]
    fn registry_references_in_their_forms() {
        let r = reg("127.0.0.1:5000/busybox:1.36");
        assert_eq!(
            (r.registry(), r.repository(), r.tag(), r.digest()),
            ("127.0.0.1:5000", "busybox", Some("1.36"), None)
        );
        let r = reg("localhost:5000/team/app");
        assert_eq!((r.repository(), r.tag()), ("team/app", Some("latest")));
        let r = reg(&format!("busybox@sha256:{HEX}"));
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.registry_address(), "index.docker.io");
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(format!("sha256:{HEX}").as_str()));
        let r = reg(&format!("ghcr.io/org/img:v1@sha256:{HEX}"));
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("ghcr.io", "org/img", Some("v1"))
        );
        assert_eq!(r.to_string(), format!("ghcr.io/org/img:v1@sha256:{HEX}"));
        let pinned = r.with_digest(&format!("sha256:{HEX}"));
        assert_eq!(pinned.tag(), None);
        assert_eq!(pinned.repository(), "org/img");
    }

    #[test]
    fn bad_references_are_refused_with_the_reason() {
        for bad in [
            "Busybox:latest",
            "reg.io/name:",
            "name@sha256:abc",
            "name@md5:0123456789abcdef0123456789abcdef",
            &format!("name@sha512:{HEX}{HEX}"),
            "a b",
            "",
        ] {
            let e = ImageSource::parse(bad).unwrap_err();
            assert!(
                matches!(e, RegistryError::BadReference { .. }),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains("not a valid image reference"), "{e}");
        }
    }

    #[test]
    fn paths_are_local_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        for local in [
            d.clone(),
            format!("{d}:busybox:latest"),
            "/nonexistent/layout".into(),
            "./img:t".into(),
            "../x".into(),
            "~/images/x".into(),
        ] {
            assert_eq!(
                ImageSource::parse(&local).unwrap(),
                ImageSource::Local(local.clone())
            );
        }
        // A relative directory that exists is a path even without ./
        let cwd = std::env::current_dir().unwrap();
        let rel = tempfile::tempdir_in(&cwd).unwrap();
        let name = rel
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(
            ImageSource::parse(&format!("{name}:t")).unwrap(),
            ImageSource::Local(format!("{name}:t"))
        );
    }

    #[test]
    fn plain_http_only_for_loopback_and_named_registries() {
        let insecure = vec!["reg.lan".to_string(), "other.lan:5000".to_string()];
        for (arg, plain) in [
            ("127.0.0.1:5000/a", true),
            ("localhost/a", true),
            ("localhost:5000/a", true),
            ("reg.lan/a", true),
            ("reg.lan:8080/a", true),
            ("other.lan:5000/a", true),
            ("other.lan:5001/a", false),
            ("other.lan/a", false),
            ("ghcr.io/a", false),
            ("busybox", false),
            ("10.0.0.1:5000/a", false),
        ] {
            assert_eq!(reg(arg).plain_http(&insecure), plain, "{arg}");
        }
    }
}
