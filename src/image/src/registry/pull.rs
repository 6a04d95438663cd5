//! One pull with the `oci-client` crate, on a current-thread tokio runtime
//! of its own: the manifest (checked against a pinned digest), an index
//! followed to the platform's manifest (fetched by digest and checked
//! against the index's descriptor), then the config and every layer the
//! cache lacks, streamed into temporaries while their size and sha256 are
//! checked, and renamed to their digest. The reference's record is written
//! last. The client's errors become [`RegistryError`]s that say what to do.

use std::io::Write as _;
use std::time::Duration;

use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use sha2::{Digest as _, Sha256};

use crate::oci::sha256_digest;
use crate::oci::{self, media, Descriptor, Index, Manifest, OciError};

use super::{
    credentials, pick_manifest, sniff_media_type, ImageRef, Login, Progress, Pulled, RegistryError,
    RegistryOptions, Result, Store, ACCEPT, MAX_DEPTH, MAX_MANIFEST, MAX_TAGS_SHOWN,
};

/// One pull: a client for the reference's registry and what it fetched.
struct Puller<'a> {
    client: Client,
    auth: RegistryAuth,
    login: Login,
    reference: &'a ImageRef,
    store: &'a Store,
    opts: &'a mut RegistryOptions,
    scheme: &'static str,
    pulled: Pulled,
}

/// Pulls `reference` from its registry into `store` (blobs the store has
/// are not fetched) and records it; what was fetched. A loopback registry
/// is spoken to over plain HTTP first; one that answers that it speaks
/// HTTPS (Go's servers say so to a plain request on a TLS port) is asked
/// again over HTTPS, verified as any other: an upgrade on the server's
/// word, never a downgrade.
pub(super) fn pull_into(
    store: &Store,
    reference: &ImageRef,
    opts: &mut RegistryOptions,
) -> Result<Pulled> {
    let login = credentials::login_for(
        reference.registry(),
        opts.creds.as_ref(),
        opts.docker_config.as_deref(),
    )?;
    let plain = reference.plain_http(&opts.insecure);
    match pull_over(store, reference, opts, login.clone(), plain) {
        Err(RegistryError::WantsHttps { .. }) if reference.is_loopback() => {
            tracing::info!(%reference, "the loopback registry speaks HTTPS: asking again over HTTPS");
            pull_over(store, reference, opts, login, false)
        }
        other => other,
    }
}

/// [`pull_into`] over plain HTTP or HTTPS.
fn pull_over(
    store: &Store,
    reference: &ImageRef,
    opts: &mut RegistryOptions,
    login: Login,
    plain: bool,
) -> Result<Pulled> {
    let auth = match &login {
        Login::Anonymous { .. } => RegistryAuth::Anonymous,
        Login::Basic { credentials, .. } => {
            RegistryAuth::Basic(credentials.username.clone(), credentials.password.clone())
        }
    };
    let protocol = if plain {
        ClientProtocol::HttpsExcept(vec![reference.registry_address().to_string()])
    } else {
        ClientProtocol::Https
    };
    // reqwest is built without a crypto provider of its own: rustls' ring.
    // Installing fails only when one is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_from(ClientConfig {
        protocol,
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..ClientConfig::default()
    })
    .map_err(|e| RegistryError::Client(Box::new(e)))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::Client(Box::new(e)))?;
    tracing::debug!(%reference, http = plain, ?login, "pulling");
    let mut puller = Puller {
        client,
        auth,
        login,
        reference,
        store,
        opts,
        scheme: if plain { "http" } else { "https" },
        pulled: Pulled {
            reference: reference.to_string(),
            digest: String::new(),
            manifest_digest: String::new(),
            pulled: true,
            blobs_fetched: 0,
            blobs_reused: 0,
            bytes_fetched: 0,
        },
    };
    runtime.block_on(puller.run())?;
    Ok(puller.pulled)
}

impl Puller<'_> {
    async fn run(&mut self) -> Result<()> {
        let reference = self.reference;
        let raw = match self
            .client
            .pull_manifest_raw(reference.as_oci(), &self.auth, ACCEPT)
            .await
        {
            Ok((raw, _)) => raw,
            Err(e) => {
                let e = self.classify(e, "manifest", reference.digest());
                return Err(self.explain_missing(e).await);
            }
        };
        let digest = sha256_digest(&raw);
        if let Some(pinned) = reference.digest() {
            if pinned != digest {
                return Err(self.mismatch(
                    "manifest",
                    pinned,
                    format!("content hashes to {digest}"),
                ));
            }
        }
        let top = self.store_manifest(&raw, &digest)?;
        self.pulled.digest = digest;
        let manifest_desc = self.platform_manifest(top.clone(), 0).await?;
        self.pulled.manifest_digest = manifest_desc.digest.clone();
        let manifest: Manifest = serde_json::from_slice(
            &self.store.layout()?.read_blob(&manifest_desc)?,
        )
        .map_err(|source| OciError::Json {
            what: "image manifest".into(),
            source,
        })?;
        self.fetch_blob(&manifest.config, "config").await?;
        for layer in &manifest.layers {
            self.fetch_blob(layer, "layer").await?;
        }
        // Only now, with every blob in place, does the reference resolve.
        self.store.set_record(reference, &top)?;
        Ok(())
    }

    /// A registry may answer "manifest unknown" for a repository it does
    /// not have at all (distribution 2.8 does): the tag list tells a wrong
    /// name from a missing tag, and names the tags there are.
    async fn explain_missing(&self, e: RegistryError) -> RegistryError {
        let RegistryError::ManifestUnknown {
            registry,
            repository,
            what,
            ..
        } = e
        else {
            return e;
        };
        match self
            .client
            .list_tags(
                self.reference.as_oci(),
                &self.auth,
                Some(MAX_TAGS_SHOWN + 1),
                None,
            )
            .await
        {
            Ok(list) => {
                let mut tags = list.tags;
                let more = tags.len() > MAX_TAGS_SHOWN;
                tags.truncate(MAX_TAGS_SHOWN);
                let known = if tags.is_empty() {
                    "; it has no tags".to_string()
                } else {
                    format!(
                        "; its tags: {}{}",
                        tags.join(", "),
                        if more { ", ..." } else { "" }
                    )
                };
                RegistryError::ManifestUnknown {
                    registry,
                    repository,
                    what,
                    known,
                }
            }
            Err(list_error) => match self.classify(list_error, "tag list", None) {
                name @ RegistryError::NameUnknown { .. } => name,
                _ => RegistryError::ManifestUnknown {
                    registry,
                    repository,
                    what,
                    known: String::new(),
                },
            },
        }
    }

    /// Stores a fetched manifest or index (already hashed) and returns its
    /// descriptor.
    fn store_manifest(&self, raw: &[u8], digest: &str) -> Result<Descriptor> {
        if raw.len() > MAX_MANIFEST {
            return Err(RegistryError::Unsupported {
                reference: self.reference.to_string(),
                detail: format!(
                    "its manifest is {} bytes, more than the {MAX_MANIFEST}-byte limit",
                    raw.len()
                ),
            });
        }
        let media_type = sniff_media_type(raw).ok_or_else(|| RegistryError::Unsupported {
            reference: self.reference.to_string(),
            detail: "the registry sent a manifest that is not JSON".into(),
        })?;
        if !ACCEPT.contains(&media_type.as_str()) {
            return Err(RegistryError::Unsupported {
                reference: self.reference.to_string(),
                detail: format!("manifest type {media_type} is not an image (want an OCI or Docker schema 2 image or index)"),
            });
        }
        self.store.put_blob(digest, raw)?;
        Ok(Descriptor {
            media_type,
            digest: digest.to_string(),
            size: raw.len() as u64,
            platform: None,
            annotations: None,
        })
    }

    /// Follows indexes down to the platform's image manifest, fetching
    /// each manifest by digest and checking it against its descriptor.
    async fn platform_manifest(&mut self, desc: Descriptor, depth: usize) -> Result<Descriptor> {
        if depth > MAX_DEPTH {
            return Err(OciError::TooDeep.into());
        }
        if !matches!(
            desc.media_type.as_str(),
            media::OCI_INDEX | media::DOCKER_LIST
        ) {
            return Ok(desc);
        }
        let raw = self.store.layout()?.read_blob(&desc)?;
        let index: Index = serde_json::from_slice(&raw).map_err(|source| OciError::Json {
            what: "image index".into(),
            source,
        })?;
        let platform = &self.opts.platform;
        let pick = pick_manifest(&index, platform).ok_or_else(|| {
            let offered: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                .collect();
            RegistryError::Unsupported {
                reference: self.reference.to_string(),
                detail: format!(
                    "no image for platform {platform} (the index offers: {})",
                    if offered.is_empty() {
                        "none".into()
                    } else {
                        offered.join(", ")
                    }
                ),
            }
        })?;
        if !self.store.has_blob(&pick)? {
            let by_digest = self.reference.with_digest(&pick.digest);
            let (raw, _) = self
                .client
                .pull_manifest_raw(by_digest.as_oci(), &self.auth, ACCEPT)
                .await
                .map_err(|e| self.classify(e, "manifest", Some(&pick.digest)))?;
            let got = sha256_digest(&raw);
            if got != pick.digest || raw.len() as u64 != pick.size {
                return Err(self.mismatch(
                    "manifest",
                    &pick.digest,
                    format!(
                        "{} bytes hashing to {got}, want {} bytes",
                        raw.len(),
                        pick.size
                    ),
                ));
            }
            self.store_manifest(&raw, &got)?;
        }
        Box::pin(self.platform_manifest(pick, depth + 1)).await
    }

    /// Downloads a config or layer blob into the cache unless it is there,
    /// checking size and digest as it streams.
    async fn fetch_blob(&mut self, desc: &Descriptor, what: &'static str) -> Result<()> {
        let digest = desc.digest.as_str();
        oci::digest_hex(digest)?;
        let size = desc.size;
        if self.store.has_blob(desc)? {
            self.pulled.blobs_reused += 1;
            self.report(Progress::Done {
                digest,
                size,
                reused: true,
            });
            return Ok(());
        }
        self.report(Progress::Start { digest, size });
        let mut stream = self
            .client
            .pull_blob_stream(self.reference.as_oci(), digest)
            .await
            .map_err(|e| self.classify(e, what, Some(digest)))?;
        let mut temp = self.store.temp_blob()?;
        let mut hasher = Sha256::new();
        let mut done: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client checks the digest too, and says so at the end
                // of the stream: report what we saw ourselves.
                Err(_) if done == size => break,
                Err(e) => {
                    return Err(RegistryError::Registry {
                        registry: self.reference.registry().to_string(),
                        what: format!("{what} {digest}"),
                        source: OciDistributionError::IoError(e),
                    })
                }
            };
            done = done.saturating_add(chunk.len() as u64);
            if done > size {
                return Err(self.mismatch(what, digest, format!("longer than its {size} bytes")));
            }
            hasher.update(&chunk);
            temp.write_all(&chunk)
                .map_err(|source| RegistryError::Cache {
                    path: temp.path().to_path_buf(),
                    source,
                })?;
            self.report(Progress::Bytes { digest, done, size });
        }
        if done != size {
            return Err(self.mismatch(what, digest, format!("{done} bytes, want {size}")));
        }
        let got = format!("sha256:{}", oci::hex(&hasher.finalize()));
        if got != digest {
            return Err(self.mismatch(what, digest, format!("content hashes to {got}")));
        }
        self.store.commit_blob(temp, digest)?;
        self.pulled.blobs_fetched += 1;
        self.pulled.bytes_fetched += size;
        self.report(Progress::Done {
            digest,
            size,
            reused: false,
        });
        Ok(())
    }

    fn report(&mut self, event: Progress<'_>) {
        if let Some(p) = self.opts.progress.as_mut() {
            p(event);
        }
    }

    fn mismatch(&self, what: &'static str, digest: &str, detail: String) -> RegistryError {
        RegistryError::DigestMismatch {
            registry: self.reference.registry().to_string(),
            what,
            digest: digest.to_string(),
            detail,
        }
    }

    /// Turns the client's error into one that says what to do.
    fn classify(
        &self,
        e: OciDistributionError,
        what: &'static str,
        digest: Option<&str>,
    ) -> RegistryError {
        let registry = self.reference.registry().to_string();
        let repository = self.reference.repository().to_string();
        if let OciDistributionError::RequestError(r) = &e {
            if let Some(reason) = certificate_problem(r) {
                return RegistryError::Certificate {
                    registry: self.reference.registry_address().to_string(),
                    reason,
                    source: e,
                };
            }
        }
        let refused = || match &self.login {
            Login::Basic {
                credentials,
                source,
            } => RegistryError::LoginRefused {
                registry: registry.clone(),
                user: credentials.username.clone(),
                source_name: source.clone(),
            },
            Login::Anonymous { creds_store } => RegistryError::LoginRequired {
                registry: registry.clone(),
                config: self
                    .opts
                    .docker_config
                    .as_deref()
                    .map_or_else(|| "none".into(), |p| p.display().to_string()),
                store_note: creds_store.as_ref().map_or_else(String::new, |s| {
                    format!("; its credsStore docker-credential-{s} is not queried by husk")
                }),
            },
        };
        let denied = || RegistryError::Denied {
            registry: registry.clone(),
            repository: repository.clone(),
            who: match &self.login {
                Login::Basic { credentials, .. } => format!(" for user {:?}", credentials.username),
                Login::Anonymous { .. } => " without a login".into(),
            },
        };
        let missing = || RegistryError::ManifestUnknown {
            registry: registry.clone(),
            repository: repository.clone(),
            what: match (digest, self.reference.tag()) {
                (Some(d), _) => format!("{what} {d}"),
                (None, Some(t)) => format!("tag {t:?}"),
                (None, None) => what.to_string(),
            },
            known: String::new(),
        };
        match e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => refused(),
            OciDistributionError::RegistryError { ref envelope, .. } => {
                let code = envelope.errors.first().map(|c| &c.code);
                match code {
                    Some(OciErrorCode::NameUnknown) => RegistryError::NameUnknown {
                        registry,
                        repository,
                    },
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound,
                    ) => missing(),
                    Some(OciErrorCode::Unauthorized) => refused(),
                    Some(OciErrorCode::Denied) => denied(),
                    _ => RegistryError::Registry {
                        registry,
                        what: format!("{what} of {}", self.reference),
                        source: e,
                    },
                }
            }
            // Go's HTTP server (distribution's) to a plain request on a
            // TLS port.
            OciDistributionError::ServerError {
                code: 400,
                ref message,
                ..
            } if self.scheme == "http" && message.contains("HTTP request to an HTTPS server") => {
                RegistryError::WantsHttps {
                    registry: self.reference.registry_address().to_string(),
                }
            }
            OciDistributionError::ServerError { code: 401, .. } => refused(),
            OciDistributionError::ServerError { code: 403, .. } => denied(),
            OciDistributionError::ServerError { code: 404, .. } => missing(),
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError {
                    ref expected,
                    ref actual,
                },
            ) => self.mismatch(what, expected, format!("content hashes to {actual}")),
            OciDistributionError::RequestError(ref r)
                if r.is_connect() || r.is_timeout() || r.is_request() =>
            {
                RegistryError::Unreachable {
                    registry: self.reference.registry_address().to_string(),
                    scheme: self.scheme,
                    hint: if self.scheme == "https" {
                        " (if it serves plain HTTP, name it with --insecure-registry)"
                    } else {
                        ""
                    },
                    source: e,
                }
            }
            _ => RegistryError::Registry {
                registry,
                what: format!("{what} of {}", self.reference),
                source: e,
            },
        }
    }
}

/// Why the registry's certificate was refused, if that is what `e` (a
/// request's error) comes down to: a rustls certificate error somewhere in
/// its causes (inside an `io::Error` on the way, whose `source` skips
/// the error it wraps), told as what is wrong and what to do.
fn certificate_problem(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::CertificateError as C;
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(rustls::Error::InvalidCertificate(c)) = err.downcast_ref::<rustls::Error>() {
            return Some(match c {
                C::UnknownIssuer => {
                    "it is signed by a CA this host does not trust (add the CA to the \
                     system's store, or point SSL_CERT_FILE at a PEM file with it)"
                }
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    "it is not issued for this registry's name"
                }
                C::Expired | C::ExpiredContext { .. } => "it has expired",
                C::NotValidYet | C::NotValidYetContext { .. } => {
                    "it is not valid yet (is this host's clock right?)"
                }
                C::Revoked => "it is revoked",
                _ => "it does not verify (the cause follows)",
            });
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            let inner: &(dyn std::error::Error + 'static) = inner;
            if let Some(found) = certificate_problem(inner) {
                return Some(found);
            }
        }
        next = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a cause, as hyper's and reqwest's wrap theirs.
    #[derive(Debug)]
    struct Wrapped(Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn a_certificate_error_is_found_inside_an_io_error() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let e = Wrapped(Box::new(io));
        let found = certificate_problem(&e).unwrap();
        assert!(found.contains("SSL_CERT_FILE"), "{found}");
        let expired = Wrapped(Box::new(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired,
        )));
        assert_eq!(certificate_problem(&expired), Some("it has expired"));
    }

    #[test]
    fn other_errors_are_not_certificate_problems() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(certificate_problem(&Wrapped(Box::new(refused))), None);
        let other = rustls::Error::General("handshake".into());
        assert_eq!(certificate_problem(&Wrapped(Box::new(other))), None);
    }
}
