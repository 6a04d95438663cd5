//! `husk pull` and `husk image rootfs REF` against a real registry
//! (docker-registry on 127.0.0.1, filled with `skopeo copy` from the bundled
//! busybox image): by tag, by digest, by tag and digest, with per-blob
//! progress on a terminal and none otherwise; a multi-platform index
//! resolves to this host's image; a second image
//! sharing the layer fetches no layer again (the registry's access log
//! says); a wrong name, a missing tag, an unreachable registry and an
//! uncached image under `--pull never` fail with messages that say so; a
//! blob corrupted in the registry's storage fails the pull on its digest
//! and leaves nothing in the cache; a registry behind htpasswd refuses an
//! anonymous pull and wrong credentials and serves `--creds` and a Docker
//! config.json. A registry serving HTTPS with a certificate of the
//! test's own CA is pulled from with that CA trusted (`SSL_CERT_FILE`),
//! its login over TLS, and refused with the system's CAs alone or spoken
//! to as an insecure (plain HTTP) one; on its loopback address (plain
//! HTTP first) its answer that it speaks HTTPS makes husk ask again over
//! verified HTTPS. A registry behind bearer tokens
//! (distribution's token auth, a token server of the test's) turns away
//! a pull without a login or with a wrong one and serves the image for a
//! token. All on this host: no guest boots here (tests/run.rs runs a
//! registry image in a microVM).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use husk_tests::husk_binary;
use husk_tests::registry::{base64, Options, Registry, Tls, TokenServer, PASSWORD, USER};
use serde_json::Value;

/// A scratch directory of this test, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-registry-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// husk with `HUSK_CACHE_DIR=cache` and no Docker config unless `env` sets one.
fn husk(cache: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(husk_binary());
    cmd.args(args)
        .env("HUSK_CACHE_DIR", cache)
        .env_remove("HUSK_REGISTRY_CREDS")
        .env("DOCKER_CONFIG", cache.join("no-docker-config"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run husk")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `husk pull`'s digest; panics with stderr on failure. A pull is silent
/// on stderr when stderr is not a terminal.
fn pull(cache: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
    let mut all = vec!["pull"];
    all.extend_from_slice(args);
    let out = husk(cache, &all, env);
    assert!(out.status.success(), "husk {all:?}: {}", stderr(&out));
    assert_eq!(stderr(&out), "", "a pull printed on a non-terminal stderr");
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    digest
}

/// Runs a failing husk command and returns its stderr.
fn fails(cache: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
    let out = husk(cache, args, env);
    assert_eq!(
        out.status.code(),
        Some(1),
        "husk {args:?}: {}",
        stderr(&out)
    );
    stderr(&out)
}

/// Writes the bundled busybox image to `dir` as `busybox:latest`, and the
/// same busybox with another command as `other:1` (same layer, other
/// config); returns (layout, layer digest).
fn busybox_layouts(dir: &Path, cache: &Path) -> (PathBuf, String) {
    let layout = dir.join("bb");
    for args in [
        vec!["image", "build-busybox", layout.to_str().unwrap()],
        vec![
            "image",
            "build-busybox",
            dir.join("other").to_str().unwrap(),
            "--ref",
            "other:1",
            "--",
            "echo",
            "other",
        ],
    ] {
        let out = husk(cache, &args, &[]);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: Value = serde_json::from_slice(
        &fs::read(layout.join("blobs/sha256").join(&manifest_digest[7..])).unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    (layout, layer)
}

/// Files under `dir` whose names start with `.tmp-` (a pull's temporaries).
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            found.extend(temporaries(&p));
        } else if p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".tmp-")
        {
            found.push(p);
        }
    }
    found
}

#[test]
fn pulls_by_tag_and_digest_share_layers_and_build_the_rootfs() {
    let dir = scratch("pull");
    let cache = dir.join("cache");
    let (layout, layer) = busybox_layouts(&dir, &cache);
    let registry = Registry::start(&dir.join("registry"), false);
    registry.push(&layout, "busybox:latest", "busybox:latest");
    registry.push(&dir.join("other"), "other:1", "other:1");
    let busybox = registry.reference("busybox:latest");

    let t0 = std::time::Instant::now();
    let digest = pull(&cache, &[&busybox], &[]);
    eprintln!("husk pull {busybox}: {} ms", t0.elapsed().as_millis());
    let store = cache.join("registry/v1");
    assert!(store.join("blobs/sha256").join(&layer[7..]).is_file());
    assert!(store.join("blobs/sha256").join(&digest[7..]).is_file());
    let tag_record = store
        .join("refs")
        .join(&registry.address)
        .join("busybox/_tags/latest");
    assert!(tag_record.is_file());
    assert_eq!(registry.blob_gets(&layer), 1, "{}", registry.log());

    // By digest, and by tag and digest: the same image, nothing fetched.
    let by_digest = registry.reference(&format!("busybox@{digest}"));
    assert_eq!(pull(&cache, &[&by_digest], &[]), digest);
    let both = registry.reference(&format!("busybox:latest@{digest}"));
    assert_eq!(pull(&cache, &[&both], &[]), digest);
    // A second image with the same layer: its manifest and config are
    // fetched, the layer is not.
    let other = pull(&cache, &[&registry.reference("other:1")], &[]);
    assert_ne!(other, digest);
    assert_eq!(registry.blob_gets(&layer), 1, "{}", registry.log());
    assert!(temporaries(&store).is_empty());
    // On a terminal (script(1) gives it one), a line per blob on stderr.
    let shown = Command::new("script")
        .args(["-qec"])
        .arg(format!("{} pull {busybox}", husk_binary().display()))
        .arg("/dev/null")
        .env("HUSK_CACHE_DIR", dir.join("cache-tty"))
        .env("DOCKER_CONFIG", dir.join("no-docker-config"))
        .output()
        .expect("script (bsdutils) runs");
    let shown = String::from_utf8_lossy(&shown.stdout);
    let layer_line = shown
        .split(['\r', '\n'])
        .find(|l| l.contains(&layer[..19]) && l.ends_with(" done"));
    assert!(
        layer_line.is_some(),
        "no progress line for the layer: {shown:?}"
    );
    assert!(shown.contains(&digest), "{shown}");

    // The root filesystem of a cached registry image, without contacting
    // the registry (it is stopped): the pipeline of local layouts.
    drop(registry);
    let out = husk(
        &cache,
        &["image", "rootfs", "--pull", "never", &busybox],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let built: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(built["manifest_digest"], digest.as_str());
    assert_eq!(built["config"]["cmd"], serde_json::json!(["sh"]));
    // The same image from its local layout is the same cache entry.
    let local = husk(&cache, &["image", "rootfs", layout.to_str().unwrap()], &[]);
    let local: Value = serde_json::from_slice(&local.stdout).unwrap();
    assert_eq!(local["rootfs"], built["rootfs"]);
    assert_eq!(local["cached"], true);
    // `--pull missing` (the default) needs no registry for a cached tag;
    // `--pull always` does, and says it cannot reach it.
    let out = husk(&cache, &["image", "rootfs", &busybox], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = fails(
        &cache,
        &["image", "rootfs", "--pull", "always", &busybox],
        &[],
    );
    assert!(err.contains("cannot reach the registry"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_names_missing_tags_and_unreachable_registries_say_so() {
    let dir = scratch("errors");
    let cache = dir.join("cache");
    let (layout, _) = busybox_layouts(&dir, &cache);
    let registry = Registry::start(&dir.join("registry"), false);
    registry.push(&layout, "busybox:latest", "busybox:latest");

    let err = fails(&cache, &["pull", &registry.reference("nosuch:latest")], &[]);
    assert!(err.contains("has no repository nosuch"), "{err}");
    let err = fails(&cache, &["pull", &registry.reference("busybox:v9")], &[]);
    assert!(
        err.contains("has no tag \"v9\"") && err.contains("its tags: latest"),
        "{err}"
    );
    let zeros = format!("sha256:{}", "0".repeat(64));
    let err = fails(
        &cache,
        &["pull", &registry.reference(&format!("busybox@{zeros}"))],
        &[],
    );
    assert!(err.contains(&format!("has no manifest {zeros}")), "{err}");
    let err = fails(&cache, &["pull", "127.0.0.1:1/busybox:latest"], &[]);
    assert!(
        err.contains("cannot reach the registry 127.0.0.1:1 over http"),
        "{err}"
    );
    let err = fails(&cache, &["pull", "Not/A/Valid:Ref"], &[]);
    assert!(err.contains("not a valid image reference"), "{err}");
    let err = fails(
        &cache,
        &[
            "image",
            "rootfs",
            "--pull",
            "never",
            &registry.reference("busybox:latest"),
        ],
        &[],
    );
    assert!(err.contains("--pull never forbids pulling it"), "{err}");
    // Nothing was recorded for any of them.
    assert!(!cache.join("registry/v1/refs").exists());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn content_that_does_not_match_its_digest_is_refused_and_not_cached() {
    let dir = scratch("mismatch");
    let cache = dir.join("cache");
    let (layout, layer) = busybox_layouts(&dir, &cache);
    let registry = Registry::start(&dir.join("registry"), false);
    registry.push(&layout, "busybox:latest", "busybox:latest");
    let busybox = registry.reference("busybox:latest");
    // Flip a byte of the layer in the registry's storage: the registry
    // still serves it under its digest.
    let blob = registry.blob_file(&layer);
    let mut data = fs::read(&blob).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&blob, &data).unwrap();
    let err = fails(&cache, &["pull", &busybox], &[]);
    assert!(
        err.contains(&format!("layer {layer} from {}", registry.address))
            && err.contains("does not match its digest"),
        "{err}"
    );
    let store = cache.join("registry/v1");
    assert!(!store.join("blobs/sha256").join(&layer[7..]).exists());
    assert!(!store.join("refs").exists(), "a failed pull left a record");
    assert!(temporaries(&store).is_empty(), "{:?}", temporaries(&store));

    // A manifest whose content differs from the digest it is served under
    // (still JSON, which the registry parses before serving it).
    data[mid] ^= 0xff;
    fs::write(&blob, &data).unwrap();
    let digest = pull(&cache, &[&busybox], &[]);
    let manifest = registry.blob_file(&digest);
    let mut m = fs::read(&manifest).unwrap();
    m.insert(1, b' ');
    fs::write(&manifest, &m).unwrap();
    let fresh = dir.join("cache2");
    let err = fails(
        &fresh,
        &["pull", &registry.reference(&format!("busybox@{digest}"))],
        &[],
    );
    assert!(
        err.contains(&format!("manifest {digest}")) && err.contains("does not match its digest"),
        "{err}"
    );
    assert!(!fresh.join("registry/v1/refs").exists());
    fs::remove_dir_all(&dir).unwrap();
}

/// What every registry behind logins must do: a pull without a login is
/// told to log in (`--creds`), a wrong password is refused by user name
/// without printing it, `--creds` pulls. The pulled digest.
fn logins_refused_then_accepted(cache: &Path, address: &str, image: &str) -> String {
    let err = fails(cache, &["pull", image], &[]);
    assert!(
        err.contains(&format!("the registry {address} asks for a login"))
            && err.contains("--creds"),
        "{err}"
    );
    let wrong = format!("{USER}:wrong");
    let err = fails(cache, &["pull", "--creds", &wrong, image], &[]);
    assert!(
        err.contains(&format!("refused the login of user \"{USER}\"")),
        "{err}"
    );
    assert!(!err.contains("wrong"), "the password was printed: {err}");
    pull(
        cache,
        &["--creds", &format!("{USER}:{PASSWORD}"), image],
        &[],
    )
}

#[test]
fn logins_from_creds_and_a_docker_config() {
    let dir = scratch("login");
    let cache = dir.join("cache");
    let (layout, _) = busybox_layouts(&dir, &cache);
    let registry = Registry::start(&dir.join("registry"), true);
    registry.push(&layout, "busybox:latest", "busybox:latest");
    let busybox = registry.reference("busybox:latest");

    let digest = logins_refused_then_accepted(&cache, &registry.address, &busybox);
    let creds = format!("{USER}:{PASSWORD}");

    // A Docker config.json with the registry's entry, in a fresh cache.
    let docker = dir.join("docker");
    fs::create_dir_all(&docker).unwrap();
    let auth = base64(creds.as_bytes());
    fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
            registry.address
        ),
    )
    .unwrap();
    let fresh = dir.join("cache2");
    let env = [("DOCKER_CONFIG", docker.as_path())];
    assert_eq!(pull(&fresh, &[&busybox], &env), digest);
    // ~/.docker/config.json when DOCKER_CONFIG is unset.
    let home = dir.join("home");
    fs::create_dir_all(home.join(".docker")).unwrap();
    fs::copy(docker.join("config.json"), home.join(".docker/config.json")).unwrap();
    let out = Command::new(husk_binary())
        .args(["pull", &busybox])
        .env("HUSK_CACHE_DIR", dir.join("cache3"))
        .env_remove("DOCKER_CONFIG")
        .env_remove("HUSK_REGISTRY_CREDS")
        .env("HOME", &home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // A credential helper for the registry is refused, not skipped.
    fs::write(
        docker.join("config.json"),
        format!(r#"{{"credHelpers":{{"{}":"pass"}}}}"#, registry.address),
    )
    .unwrap();
    let err = fails(&dir.join("cache4"), &["pull", &busybox], &env);
    assert!(
        err.contains("docker-credential-pass, which husk does not run"),
        "{err}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_loopback_registry_that_speaks_https_is_asked_again_over_https() {
    let dir = scratch("tls-loopback");
    let cache = dir.join("cache");
    let (layout, layer) = busybox_layouts(&dir, &cache);
    let tls = Tls::make(&dir.join("tls"), "localhost");
    let registry = Registry::start_with(
        &dir.join("registry"),
        Options {
            tls: Some(&tls),
            ..Options::default()
        },
    );
    registry.push(&layout, "busybox:latest", "busybox:latest");
    // 127.0.0.1:PORT: plain HTTP first, which the TLS port answers with
    // "Client sent an HTTP request to an HTTPS server"; then HTTPS,
    // verified against the test's CA.
    let busybox = registry.reference("busybox:latest");
    let digest = pull(&cache, &[&busybox], &[("SSL_CERT_FILE", tls.ca.as_path())]);
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(registry.blob_gets(&layer), 1, "{}", registry.log());
    // The upgrade is verified like any HTTPS: the CA not trusted, the
    // pull is refused for the certificate, never served over HTTP.
    let fresh = dir.join("cache-untrusted");
    let err = fails(&fresh, &["pull", &busybox], &[]);
    assert!(
        err.contains(&format!(
            "the registry {} presented a TLS certificate husk does not accept",
            registry.address
        )),
        "{err}"
    );
    assert_eq!(registry.blob_gets(&layer), 1, "{}", registry.log());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_registry_behind_bearer_tokens_takes_a_login_and_refuses_none() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = scratch("token");
    let cache = dir.join("cache");
    let (layout, layer) = busybox_layouts(&dir, &cache);
    let token = TokenServer::start(&dir.join("token"));
    let registry = Registry::start_with(
        &dir.join("registry"),
        Options {
            token: Some(&token),
            ..Options::default()
        },
    );
    registry.push(&layout, "busybox:latest", "busybox:latest");
    let busybox = registry.reference("busybox:latest");
    let granted = token.granted.load(SeqCst);
    let refused = token.refused.load(SeqCst);

    // No login and a wrong password: the token server refuses, husk
    // tells the two apart; the login gets a token, with which the
    // registry serves the image.
    logins_refused_then_accepted(&cache, &registry.address, &busybox);
    assert!(
        token.refused.load(SeqCst) >= refused + 2,
        "no token was refused"
    );
    assert!(token.granted.load(SeqCst) > granted, "no token was granted");
    assert_eq!(registry.blob_gets(&layer), 1, "{}", registry.log());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_multi_platform_index_resolves_to_this_hosts_image() {
    let dir = scratch("index");
    let cache = dir.join("cache");
    let (layout, _) = busybox_layouts(&dir, &cache);
    // An index of two images in the busybox layout: `other:1`'s manifest
    // claiming arm64, and busybox's for amd64, as multi-platform images
    // are published.
    let read_json = |p: &Path| -> Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
    let busybox = read_json(&layout.join("index.json"))["manifests"][0].clone();
    let other_layout = dir.join("other");
    let other = read_json(&other_layout.join("index.json"))["manifests"][0].clone();
    for blob in fs::read_dir(other_layout.join("blobs/sha256")).unwrap() {
        let blob = blob.unwrap();
        let _ = fs::copy(
            blob.path(),
            layout.join("blobs/sha256").join(blob.file_name()),
        );
    }
    let entry = |d: &Value, arch: &str| {
        serde_json::json!({
            "mediaType": d["mediaType"], "digest": d["digest"], "size": d["size"],
            "platform": {"os": "linux", "architecture": arch}
        })
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&other, "arm64"), entry(&busybox, "amd64")]
    }))
    .unwrap();
    let index_digest = format!("sha256:{}", sha256_hex(&index));
    fs::write(layout.join("blobs/sha256").join(&index_digest[7..]), &index).unwrap();
    let mut top = read_json(&layout.join("index.json"));
    top["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"}
        }));
    fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();

    let registry = Registry::start(&dir.join("registry"), false);
    let mut copy = Command::new("skopeo");
    copy.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:multi", layout.display()))
        .arg(format!("docker://{}", registry.reference("multi:1")));
    let out = copy.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let reference = registry.reference("multi:1");
    assert_eq!(pull(&cache, &[&reference], &[]), index_digest);
    let out = husk(
        &cache,
        &["image", "rootfs", "--pull", "never", &reference],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let built: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(built["manifest_digest"], busybox["digest"]);
    assert_eq!(built["config"]["cmd"], serde_json::json!(["sh"]));
    // The arm64 entry is picked for arm64, and refused: its config says
    // amd64. A platform the index lacks is named with what it offers.
    let err = fails(
        &dir.join("cache-arm"),
        &["image", "rootfs", "--platform", "linux/arm64", &reference],
        &[],
    );
    assert!(err.contains("no image for platform linux/arm64"), "{err}");
    let err = fails(
        &dir.join("cache-riscv"),
        &["pull", "--platform", "linux/riscv64", &reference],
        &[],
    );
    assert!(
        err.contains(
            "no image for platform linux/riscv64 (the index offers: linux/arm64, linux/amd64)"
        ),
        "{err}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// The name the TLS registry's certificate is for. It resolves to
/// 127.0.0.1 through a private /etc/hosts: a loopback address itself
/// would be spoken to over plain HTTP.
const TLS_NAME: &str = "registry.husk.test";

/// husk in a mount namespace of its own whose /etc/hosts maps
/// [`TLS_NAME`] to 127.0.0.1, with `HUSK_CACHE_DIR=cache`; `SSL_CERT_FILE`
/// is `ca` when given, else unset (the system's CA store).
fn husk_tls(dir: &Path, cache: &Path, args: &[&str], ca: Option<&Path>) -> Output {
    let hosts = dir.join("hosts");
    fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n127.0.0.1 {TLS_NAME}\n"),
    )
    .unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
        .arg(&hosts)
        .arg(husk_binary())
        .args(args)
        .env("HUSK_CACHE_DIR", cache)
        .env_remove("HUSK_REGISTRY_CREDS")
        .env("DOCKER_CONFIG", cache.join("no-docker-config"))
        .env_remove("SSL_CERT_DIR");
    match ca {
        Some(ca) => cmd.env("SSL_CERT_FILE", ca),
        None => cmd.env_remove("SSL_CERT_FILE"),
    };
    cmd.output().expect("run husk in a mount namespace")
}

#[test]
#[ignore = "needs root: a mount namespace with its own /etc/hosts"]
fn an_https_registry_is_verified_against_the_trusted_cas() {
    let dir = scratch("tls");
    let cache = dir.join("cache");
    let (layout, layer) = busybox_layouts(&dir, &cache);
    let tls = Tls::make(&dir.join("tls"), TLS_NAME);
    let registry = Registry::start_with(
        &dir.join("registry"),
        Options {
            htpasswd: true,
            tls: Some(&tls),
            ..Options::default()
        },
    );
    registry.push(&layout, "busybox:latest", "busybox:latest");
    let port = registry.address.rsplit_once(':').unwrap().1;
    let busybox = format!("{TLS_NAME}:{port}/busybox:latest");
    let creds = format!("{USER}:{PASSWORD}");
    let ca = Some(tls.ca.as_path());

    // The test's CA trusted: the registry's login challenge over TLS,
    // then the pull with the login.
    let out = husk_tls(&dir, &cache, &["pull", &busybox], ca);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("the registry {TLS_NAME}:{port} asks for a login")),
        "{}",
        stderr(&out)
    );
    let out = husk_tls(&dir, &cache, &["pull", "--creds", &creds, &busybox], ca);
    assert!(out.status.success(), "{}", stderr(&out));
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(registry.blob_gets(&layer), 1, "{}", registry.log());

    // The system's CAs alone do not know the test's: refused before any
    // blob, the message says why and what to do, nothing is cached.
    let fresh = dir.join("cache-untrusted");
    let out = husk_tls(&dir, &fresh, &["pull", "--creds", &creds, &busybox], None);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("certificate") && err.contains("SSL_CERT_FILE"),
        "{err}"
    );
    // Said once, by husk: not also by the TLS library's own log.
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains(PASSWORD), "the password was printed: {err}");
    assert_eq!(registry.blob_gets(&layer), 1, "{}", registry.log());
    assert!(temporaries(&fresh).is_empty(), "{:?}", temporaries(&fresh));
    assert!(!fresh.join("blobs").exists(), "a blob was cached");

    // Named insecure, it is spoken to over plain HTTP, which a TLS port
    // refuses: an error that says so and what to do, not a hang or a
    // silent retry.
    let out = husk_tls(
        &dir,
        &fresh,
        &[
            "pull",
            "--insecure-registry",
            TLS_NAME,
            "--creds",
            &creds,
            &busybox,
        ],
        ca,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "the registry {TLS_NAME}:{port} speaks HTTPS, and husk spoke plain HTTP"
        )) && err.contains("drop that"),
        "{err}"
    );
    assert_eq!(registry.blob_gets(&layer), 1, "{}", registry.log());
    fs::remove_dir_all(&dir).unwrap();
}

/// sha256 of `data` in hex, by sha256sum(1).
fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}
