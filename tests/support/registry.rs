//! A real OCI registry for tests: Debian's docker-registry (distribution
//! 2.8, unpacked by `husk_docker_registry` in resources/lib.sh) serving a
//! scratch directory on a free loopback port, optionally behind htpasswd
//! logins, filled with `skopeo copy` from local OCI layouts. Its access log
//! tells which blobs a pull fetched; its storage directory can be corrupted
//! on purpose. It can serve HTTPS with a certificate of a test CA made
//! with openssl ([`Tls`]). Stopped (killed and waited for) when dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::run_ok;

/// A user the login tests know, and the password.
pub const USER: &str = "husk";
/// Its password.
pub const PASSWORD: &str = "s3cret-pw";

/// A certificate authority of a test and a server certificate it signed
/// (ECDSA P-256, valid two days), made with the openssl command.
pub struct Tls {
    /// The CA's certificate (PEM): what a client trusts.
    pub ca: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

impl Tls {
    /// A fresh CA and a certificate for DNS name `name` and 127.0.0.1,
    /// signed by it, in `dir`.
    pub fn make(dir: &Path, name: &str) -> Tls {
        std::fs::create_dir_all(dir).expect("tls dir");
        let tls = Tls {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        let ca_key = dir.join("ca.key");
        let csr = dir.join("server.csr");
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=DNS:{name},IP:127.0.0.1\n\
                 basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\n"
            ),
        )
        .expect("write extensions");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-days", "2", "-subj", "/CN=husk test CA"])
                .args(ec)
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(&ca_key)
                .arg("-out")
                .arg(&tls.ca),
        );
        run_ok(
            Command::new("openssl")
                .args(["req", "-subj", &format!("/CN={name}")])
                .args(ec)
                .arg("-keyout")
                .arg(&tls.key)
                .arg("-out")
                .arg(&csr),
        );
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&tls.ca)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&tls.cert),
        );
        tls
    }
}

/// How a test registry is set up.
#[derive(Default)]
pub struct Options<'a> {
    /// Only [`USER`] with [`PASSWORD`] may pull or push (htpasswd, Basic).
    pub htpasswd: bool,
    /// HTTPS only, with this certificate.
    pub tls: Option<&'a Tls>,
    /// Bearer tokens from this server (which logs [`USER`] in).
    pub token: Option<&'a TokenServer>,
}

/// A running registry.
pub struct Registry {
    child: Child,
    dir: PathBuf,
    /// `127.0.0.1:PORT`.
    pub address: String,
    auth: bool,
}

/// The docker-registry binary: $HUSK_DOCKER_REGISTRY, else where
/// resources/lib.sh unpacks it.
pub fn registry_binary() -> PathBuf {
    crate::cached_tool(
        "HUSK_DOCKER_REGISTRY",
        "/var/cache/husk/docker-registry/usr/bin/docker-registry",
        "resources/lib.sh's husk_docker_registry unpacks it (resources/test.sh runs it)",
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Registry {
    /// Starts a registry in `dir` (storage, config and log go there); with
    /// `auth`, only [`USER`] with [`PASSWORD`] may pull or push.
    pub fn start(dir: &Path, auth: bool) -> Registry {
        Registry::start_with(
            dir,
            Options {
                htpasswd: auth,
                ..Options::default()
            },
        )
    }

    /// A registry as `opts` say: logins, HTTPS, bearer tokens.
    pub fn start_with(dir: &Path, opts: Options) -> Registry {
        let Options {
            htpasswd: auth,
            tls,
            token,
        } = opts;
        std::fs::create_dir_all(dir).expect("registry dir");
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n",
            dir.join("storage").display()
        );
        if auth {
            let htpasswd = dir.join("htpasswd");
            // bcrypt, which the registry requires.
            run_ok(
                Command::new("htpasswd")
                    .args(["-B", "-b", "-c"])
                    .arg(&htpasswd)
                    .args([USER, PASSWORD]),
            );
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: husk-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        // The port is free now; another process could take it before the
        // registry binds it, which then fails the start below, loudly.
        let address = format!("127.0.0.1:{}", free_port());
        config.push_str(&format!("http:\n  addr: {address}\n"));
        if let Some(token) = token {
            config.push_str(&token.registry_auth());
        }
        if let Some(tls) = tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                tls.cert.display(),
                tls.key.display()
            ));
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let log = std::fs::File::create(dir.join("registry.log")).expect("registry log");
        let child = Command::new(registry_binary())
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut registry = Registry {
            child,
            dir: dir.to_path_buf(),
            address,
            auth: auth || token.is_some(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&registry.address).is_err() {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry ended with {status}:\n{}", registry.log());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen in 20 s:\n{}",
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        registry
    }

    /// `127.0.0.1:PORT/NAME`.
    pub fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.address)
    }

    /// Pushes image `REF` of the OCI layout `layout` as `name` (NAME:TAG).
    pub fn push(&self, layout: &Path, layout_ref: &str, name: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if self.auth {
            cmd.arg(format!("--dest-creds={USER}:{PASSWORD}"));
        }
        cmd.arg(format!("oci:{}:{layout_ref}", layout.display()))
            .arg(format!("docker://{}", self.reference(name)));
        run_ok(&mut cmd);
    }

    /// The registry's log so far (its access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// How many times a blob was served (GET .../blobs/DIGEST answered 200).
    pub fn blob_gets(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} ");
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET ") && l.contains(&needle) && l.contains("\" 200 "))
            .count()
    }

    /// The file holding a blob in the registry's storage.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (a config.json's "auth", a JWT's `x5c`).
pub fn base64(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// base64url without padding, as JWTs are written.
fn base64url(data: &[u8]) -> String {
    base64(data)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

/// The `service` a token registry names, and the tokens' audience.
const TOKEN_SERVICE: &str = "husk-test-registry";
/// The tokens' issuer.
const TOKEN_ISSUER: &str = "husk-test-token-server";

/// A token server for a registry behind bearer tokens (distribution's
/// `auth: token`, the scheme of Docker Hub, GHCR and most hosted
/// registries): `GET /token?service=..&scope=repository:NAME:ACTIONS`
/// with [`USER`]'s Basic login answers a JWT (RS256, its certificate in
/// `x5c`) granting those of pull and push on NAME; no login or a wrong
/// one answers 401.
/// Written here because Debian packages no token server; the registry
/// that checks its tokens is the real one. Each request is counted.
pub struct TokenServer {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    /// The certificate the tokens are signed with: the registry's
    /// `rootcertbundle`.
    pub cert: PathBuf,
    /// Requests answered with a token.
    pub granted: Arc<AtomicUsize>,
    /// Requests refused.
    pub refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    address: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    /// Makes a signing key and certificate in `dir` and serves tokens on
    /// a free loopback port.
    pub fn start(dir: &Path) -> TokenServer {
        std::fs::create_dir_all(dir).expect("token dir");
        let key = dir.join("token.key");
        let cert = dir.join("token.pem");
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=husk test token signer",
                ])
                .args(["-newkey", "rsa:2048", "-nodes"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        );
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("openssl x509");
        assert!(der.status.success(), "openssl x509 -outform DER failed");
        let x5c = base64(&der.stdout);
        let listener = TcpListener::bind("127.0.0.1:0").expect("token server port");
        let address = listener
            .local_addr()
            .expect("token server address")
            .to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let (granted, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let thread = {
            let (stop, granted, refused) = (stop.clone(), granted.clone(), refused.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let count = if serve_token(conn, &key, &x5c) {
                        &granted
                    } else {
                        &refused
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        TokenServer {
            realm: format!("http://{address}/token"),
            cert,
            granted,
            refused,
            stop,
            address,
            thread: Some(thread),
        }
    }

    /// The registry configuration's `auth:` section for these tokens.
    pub fn registry_auth(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            self.realm,
            self.cert.display()
        )
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect(&self.address);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one token request; whether a token was granted.
fn serve_token(conn: TcpStream, key: &Path, x5c: &str) -> bool {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&conn);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return false;
    }
    let mut authorization = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("authorization") {
                        authorization = value.trim().to_string();
                    }
                }
            }
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let query = path.split_once('?').map_or("", |(_, q)| q);
    // scope=repository:NAME:pull[,push], URL-encoded (':' as %3A).
    let scope = percent_decode(
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix("scope="))
            .unwrap_or(""),
    );
    let want = format!("Basic {}", base64(format!("{USER}:{PASSWORD}").as_bytes()));
    let mut out = &conn;
    if authorization != want {
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"login required"}]}"#;
        let _ = write!(
            out,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return false;
    }
    // What is asked for, of pull and push (skopeo pushes with a token too).
    let mut access = Vec::new();
    if let Some(rest) = scope.strip_prefix("repository:") {
        if let Some((name, actions)) = rest.rsplit_once(':') {
            let actions: Vec<&str> = actions
                .split(',')
                .filter(|a| *a == "pull" || *a == "push")
                .collect();
            access
                .push(serde_json::json!({"type": "repository", "name": name, "actions": actions}));
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": USER, "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now - 10,
        "jti": format!("husk-{now}-{}", std::process::id()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    );
    let Some(signature) = rsa_sha256(key, signing_input.as_bytes()) else {
        let _ = write!(
            out,
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return false;
    };
    let token = format!("{signing_input}.{}", base64url(&signature));
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    true
}

/// An RSASSA-PKCS1-v1_5 SHA-256 signature of `data` with `key` (what
/// JWT's RS256 is), by openssl.
fn rsa_sha256(key: &Path, data: &[u8]) -> Option<Vec<u8>> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(data).ok()?;
    let out = child.wait_with_output().ok()?;
    out.status.success().then_some(out.stdout)
}

/// `%XX` escapes of a query value decoded (`+` as a space).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
