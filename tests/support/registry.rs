//! A real OCI registry for tests: Debian's docker-registry (distribution
//! 2.8, unpacked by `husk_docker_registry` in resources/lib.sh) serving a
//! scratch directory on a free loopback port, optionally behind htpasswd
//! logins, filled with `skopeo copy` from local OCI layouts. Its access log
//! tells which blobs a pull fetched; its storage directory can be corrupted
//! on purpose. Stopped (killed and waited for) when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::run_ok;

/// A user the login tests know, and the password.
pub const USER: &str = "husk";
/// Its password.
pub const PASSWORD: &str = "s3cret-pw";

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
            auth,
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
