//! What can go wrong pulling an image, each case with a message that says
//! what to do about it. The binary prints the chain once, at its edge.

use std::path::PathBuf;

use oci_client::errors::OciDistributionError;

use crate::oci::OciError;
use crate::rootfs::RootfsError;

/// Errors pulling an image. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The argument is neither a path nor a valid reference.
    #[error("{reference:?} is not a valid image reference ({reason}); want [REGISTRY/]NAME[:TAG][@sha256:HEX], or a path to a local OCI layout")]
    BadReference {
        /// The argument.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// `--creds` is not `USER:PASSWORD`.
    #[error("--creds wants USER:PASSWORD")]
    BadCreds,
    /// The Docker config could not be read.
    #[error("cannot read the Docker config {path}")]
    DockerConfigRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The Docker config is not JSON of the expected shape.
    #[error("the Docker config {path} does not parse")]
    DockerConfigParse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The Docker config's entry for the registry cannot be used.
    #[error("the credentials for {registry} in {path} cannot be used: {reason}")]
    DockerConfigAuth {
        /// The registry.
        registry: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The Docker config hands the registry to a credential helper.
    #[error("{path} keeps the credentials for {registry} in the helper docker-credential-{helper}, which husk does not run; pass --creds USER:PASSWORD instead")]
    CredentialHelper {
        /// The registry.
        registry: String,
        /// The helper's name.
        helper: String,
        /// The file.
        path: PathBuf,
    },
    /// Plain HTTP sent to a registry that speaks only HTTPS (one named
    /// insecure; a loopback one is asked again over HTTPS).
    #[error("the registry {registry} speaks HTTPS, and husk spoke plain HTTP to it because it is named with --insecure-registry: drop that")]
    WantsHttps {
        /// host[:port].
        registry: String,
    },
    /// The registry's TLS certificate did not verify.
    #[error("the registry {registry} presented a TLS certificate husk does not accept: {reason}")]
    Certificate {
        /// host[:port].
        registry: String,
        /// What is wrong with it, and what to do.
        reason: &'static str,
        /// The cause.
        source: OciDistributionError,
    },
    /// No connection to the registry.
    #[error("cannot reach the registry {registry} over {scheme}{hint}")]
    Unreachable {
        /// host[:port].
        registry: String,
        /// http or https.
        scheme: &'static str,
        /// A hint for HTTPS failures.
        hint: &'static str,
        /// The cause.
        source: OciDistributionError,
    },
    /// The registry has no repository of that name.
    #[error("the registry {registry} has no repository {repository} (check the name; some registries also say this for a repository you may not read)")]
    NameUnknown {
        /// host[:port].
        registry: String,
        /// The repository.
        repository: String,
    },
    /// The repository has no such tag or manifest.
    #[error("{repository} at {registry} has no {what}{known}")]
    ManifestUnknown {
        /// host[:port].
        registry: String,
        /// The repository.
        repository: String,
        /// `tag T` or `manifest sha256:...`.
        what: String,
        /// The tags it has, when the registry lists them.
        known: String,
    },
    /// The registry wants a login and none was given.
    #[error("the registry {registry} asks for a login: pass --creds USER:PASSWORD or add an \"auths\" entry for it to the Docker config ({config}){store_note}")]
    LoginRequired {
        /// host[:port].
        registry: String,
        /// The Docker config looked at.
        config: String,
        /// A note on a `credsStore` husk does not query.
        store_note: String,
    },
    /// The registry refused the credentials (401).
    #[error("the registry {registry} refused the login of user {user:?} (credentials from {source_name}); check them")]
    LoginRefused {
        /// host[:port].
        registry: String,
        /// The user.
        user: String,
        /// Where the credentials came from.
        source_name: String,
    },
    /// The registry denied access (403).
    #[error("the registry {registry} denies access to {repository} (403){who}")]
    Denied {
        /// host[:port].
        registry: String,
        /// The repository.
        repository: String,
        /// Whose access, for messages.
        who: String,
    },
    /// Content does not match its digest or size.
    #[error("{what} {digest} from {registry} does not match its digest: {detail}; the registry serves corrupt or tampered content")]
    DigestMismatch {
        /// host[:port].
        registry: String,
        /// manifest, config, layer.
        what: &'static str,
        /// The expected digest.
        digest: String,
        /// What differs.
        detail: String,
    },
    /// A manifest the registry sent is not one husk reads.
    #[error("{reference}: {detail}")]
    Unsupported {
        /// The reference.
        reference: String,
        /// What is not supported.
        detail: String,
    },
    /// The registry failed in another way.
    #[error("the registry {registry} failed to serve {what}")]
    Registry {
        /// host[:port].
        registry: String,
        /// What was asked for.
        what: String,
        /// The cause.
        source: OciDistributionError,
    },
    /// `--pull never` and the image is not cached.
    #[error("{reference} is not in the image cache ({cache}) and --pull never forbids pulling it; run `husk pull {reference}` first")]
    NotCached {
        /// The reference.
        reference: String,
        /// The cache directory.
        cache: PathBuf,
    },
    /// The cache could not be written or read.
    #[error("cannot write the image cache at {path}")]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP client or its runtime could not be set up.
    #[error("cannot set up the registry client")]
    Client(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Reading the pulled image from the cache failed.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// Building the root filesystem failed.
    #[error(transparent)]
    Rootfs(#[from] Box<RootfsError>),
}
