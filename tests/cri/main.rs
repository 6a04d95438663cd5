//! husk-cri: a small client of containerd's CRI plugin (the k8s-cri crate
//! over containerd's socket), the kubelet's side of a pod's life, for the
//! CRI tests and the pod start benchmark. It runs where containerd runs (in
//! the node VM on these machines).
//!
//! ```text
//! husk-cri [--socket PATH] scenario --handler NAME --image REF [--log-dir DIR]
//! husk-cri [--socket PATH] bench --handler NAME --image REF [--runs N] [--pod-mib M --pod-cpus C] [--fresh-cache DIR]
//! husk-cri [--socket PATH] behaviours --handler NAME --image REF --dynamic-image REF [--only NAME,...]
//! husk-cri [--socket PATH] resources --handler NAME --image REF [--sized-only]
//! husk-cri [--socket PATH] port-forward --handler NAME --image REF
//! husk-cri [--socket PATH] volumes|kill-virtiofsd|many|escape --handler NAME --image REF
//! ```
//!
//! `scenario` takes one pod through RunPodSandbox, CreateContainer,
//! StartContainer, ContainerStatus, ExecSync, a second container that
//! reaches the first over localhost, the containers' logs, the pod's IP
//! from the node, StopContainer, StopPodSandbox and RemovePodSandbox, and
//! prints one `CRI-<STEP> <value>` line per step; a failed step prints
//! `CRI-FAILED <step>: <error>`, removes the pod and exits 1. `bench` times
//! RunPodSandbox to a running container, `--runs` times (default 10), and
//! prints the samples and their median as JSON. `behaviours` runs the
//! checks of [`behaviours`] (seccomp profiles, privileged pods, added
//! capabilities, a dynamically linked image), one pod each; `resources`
//! the CPU and memory limits of [`resources`]; `port-forward` CRI's
//! PortForward ([`portforward`]); `volumes` Kubernetes volumes through
//! the runtime ([`volumes`]), `kill-virtiofsd` a pod whose file server
//! dies, `many` a pod of two init containers and ten sidecars, `escape` a
//! privileged container that tries to leave the pod's share.

mod behaviours;
mod clones;
mod portforward;
mod propagation;
mod resources;
mod volumes;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

type Client = RuntimeServiceClient<Channel>;
type Result<T> = std::result::Result<T, String>;

const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";

struct Args {
    socket: PathBuf,
    command: String,
    handler: String,
    image: String,
    log_dir: PathBuf,
    runs: usize,
    /// A dynamically linked image (`behaviours`).
    dynamic_image: String,
    /// `bench`: the pod's (and its container's) memory limit in MiB, as
    /// the kubelet sizes a pod (0: none).
    pod_mib: i64,
    /// `bench`: the pod's (and its container's) CPU limit (0: none).
    pod_cpus: i64,
    /// `resources`: only the pod the kubelet sized.
    sized_only: bool,
    /// `behaviours`: only these (by name; empty: all).
    only: Vec<String>,
    /// `bench`: empty this directory (husk's image cache) before each
    /// run, so each pod's container is its image's first.
    fresh_cache: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: husk-cri [--socket PATH] scenario|bench|behaviours|resources|port-forward|volumes|kill-virtiofsd|many|escape|propagation|clones --handler NAME --image REF [--dynamic-image REF] [--log-dir DIR] [--runs N] [--pod-mib M --pod-cpus C] [--fresh-cache DIR] [--only NAME,...]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        socket: DEFAULT_SOCKET.into(),
        command: String::new(),
        handler: String::new(),
        image: String::new(),
        log_dir: "/tmp/husk-cri-logs".into(),
        runs: 10,
        dynamic_image: String::new(),
        pod_mib: 0,
        pod_cpus: 0,
        sized_only: false,
        only: Vec::new(),
        fresh_cache: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--socket" => args.socket = value().into(),
            "--handler" => args.handler = value(),
            "--image" => args.image = value(),
            "--dynamic-image" => args.dynamic_image = value(),
            "--log-dir" => args.log_dir = value().into(),
            "--runs" => args.runs = value().parse().unwrap_or_else(|_| usage()),
            "--pod-mib" => args.pod_mib = value().parse().unwrap_or_else(|_| usage()),
            "--pod-cpus" => args.pod_cpus = value().parse().unwrap_or_else(|_| usage()),
            "--sized-only" => args.sized_only = true,
            "--only" => args.only = value().split(',').map(str::to_owned).collect(),
            "--fresh-cache" => args.fresh_cache = Some(value().into()),
            "scenario" | "bench" | "behaviours" | "resources" | "port-forward" | "volumes"
            | "kill-virtiofsd" | "many" | "escape" | "propagation" | "clones"
                if args.command.is_empty() =>
            {
                args.command = a
            }
            _ => usage(),
        }
    }
    if args.command.is_empty() || args.handler.is_empty() || args.image.is_empty() {
        usage();
    }
    args
}

async fn connect(socket: &Path) -> Result<Client> {
    let path = socket.to_path_buf();
    // The URI is a placeholder: every connection goes to the unix socket.
    let channel = Endpoint::try_from("http://[::1]:50051")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    Ok(RuntimeServiceClient::new(channel))
}

fn status_err(what: &str) -> impl FnOnce(tonic::Status) -> String + '_ {
    move |s| format!("{what}: {} ({:?})", s.message(), s.code())
}

/// The pod's namespaces as the kubelet sets them by default, for the pod
/// and again for each container: network and IPC shared by the pod, a PID
/// namespace per container.
fn namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// The pod's configuration.
fn pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.join(name).display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Makes a pod's sandbox privileged (a privileged container needs it).
fn privileged_pod(config: &mut PodSandboxConfig) {
    if let Some(sc) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        sc.privileged = true;
    }
}

/// Makes a container privileged.
fn privileged_container(config: &mut ContainerConfig) {
    if let Some(sc) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        sc.privileged = true;
    }
}

fn container_config(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    container_config_with(name, image, command, namespaces())
}

/// A container with its own namespace options (the kubelet's
/// `shareProcessNamespace: true` gives containers the pod's PID namespace).
fn container_config_with(
    name: &str,
    image: &str,
    command: &[&str],
    namespace_options: NamespaceOption,
) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(namespace_options),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod and what it holds, for the steps and for the clean-up after a
/// failed one.
struct Pod {
    id: String,
    config: PodSandboxConfig,
}

impl Pod {
    /// RunPodSandbox. A guest that triple-faulted during its boot (the
    /// rare failure of this node's nested emulation, issue 22) is shown
    /// as `CRI-GUEST-FAILURE` and the pod asked for once more, as the
    /// kubelet would; the tests count those lines.
    async fn run(c: &mut Client, config: PodSandboxConfig, handler: &str) -> Result<Pod> {
        let mut tries = 0;
        loop {
            tries += 1;
            let ran = c
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: handler.into(),
                })
                .await
                .map_err(status_err("RunPodSandbox"));
            match ran {
                Ok(r) => {
                    return Ok(Pod {
                        id: r.into_inner().pod_sandbox_id,
                        config,
                    })
                }
                Err(e) if tries == 1 && e.contains("triple-faulted") => {
                    println!(
                        "CRI-GUEST-FAILURE {}",
                        e.chars().take(600).collect::<String>()
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn create(&self, c: &mut Client, config: ContainerConfig) -> Result<String> {
        let name = config.metadata.as_ref().map(|m| m.name.clone());
        let id = c
            .create_container(CreateContainerRequest {
                pod_sandbox_id: self.id.clone(),
                config: Some(config),
                sandbox_config: Some(self.config.clone()),
            })
            .await
            .map_err(status_err("CreateContainer"))?
            .into_inner()
            .container_id;
        c.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .map_err(|s| format!("StartContainer {name:?}: {} ({:?})", s.message(), s.code()))?;
        Ok(id)
    }

    /// The pod's IP address (empty without a pod network).
    async fn ip(&self, c: &mut Client) -> Result<String> {
        let status = c
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: self.id.clone(),
                verbose: false,
            })
            .await
            .map_err(status_err("PodSandboxStatus"))?
            .into_inner()
            .status
            .ok_or("PodSandboxStatus without a status")?;
        Ok(status.network.map(|n| n.ip).unwrap_or_default())
    }

    /// Stops and removes the pod (its containers go with it).
    async fn remove(&self, c: &mut Client) -> Result<()> {
        c.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: self.id.clone(),
        })
        .await
        .map_err(status_err("StopPodSandbox"))?;
        c.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: self.id.clone(),
        })
        .await
        .map_err(status_err("RemovePodSandbox"))?;
        Ok(())
    }
}

/// The container's state and exit code.
async fn container_state(c: &mut Client, id: &str) -> Result<(ContainerState, i32)> {
    let status = c
        .container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .map_err(status_err("ContainerStatus"))?
        .into_inner()
        .status
        .ok_or("ContainerStatus without a status")?;
    let state = ContainerState::try_from(status.state).unwrap_or(ContainerState::ContainerUnknown);
    Ok((state, status.exit_code))
}

/// Waits (at most `limit`) until the container has exited; its exit code.
async fn wait_exited(c: &mut Client, id: &str, limit: Duration) -> Result<i32> {
    let t0 = Instant::now();
    loop {
        let (state, code) = container_state(c, id).await?;
        if state == ContainerState::ContainerExited {
            return Ok(code);
        }
        if t0.elapsed() > limit {
            return Err(format!("still {} after {limit:?}", state.as_str_name()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lines of a CRI log file (`<time> <stream> <tag> <text>`) as
/// (stream, text), once it holds at least `want` lines (at most 10 s).
async fn log_lines(path: &Path, want: usize) -> Vec<(String, String)> {
    let t0 = Instant::now();
    loop {
        let lines: Vec<(String, String)> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(4, ' ');
                let (_time, stream, _tag) = (f.next()?, f.next()?, f.next()?);
                Some((stream.to_string(), f.next().unwrap_or("").to_string()))
            })
            .collect();
        if lines.len() >= want || t0.elapsed() > Duration::from_secs(10) {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP GET of `/` from `ip:port`, retried for 10 s; the body's last line.
fn http_get(ip: &str, port: u16) -> Result<String> {
    let t0 = Instant::now();
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(
                &format!("{ip}:{port}")
                    .parse()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
                Duration::from_secs(2),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body.lines().last().unwrap_or("").to_string())
        })();
        match attempt {
            Ok(line) => return Ok(line),
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                return Err(format!("GET http://{ip}:{port}/: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

const SERVER: &[&str] = &[
    "sh",
    "-c",
    "mkdir -p /tmp/www && echo pod-says-hi > /tmp/www/index.html && \
     echo hello-from-cri && echo to-stderr >&2 && exec httpd -f -p 8080 -h /tmp/www",
];
const CLIENT: &[&str] = &[
    "sh",
    "-c",
    "i=0; until wget -q -O - http://127.0.0.1:8080/; do \
     i=$((i+1)); [ $i -gt 50 ] && exit 1; sleep 0.2; done",
];

/// Lists the processes it sees, one `proc <pid> <command line>` each.
const PEEK: &[&str] = &[
    "sh",
    "-c",
    "ps -o pid,args | while read pid args; do echo \"proc $pid $args\"; done",
];

async fn scenario(c: &mut Client, args: &Args) -> Result<()> {
    let version = c
        .version(VersionRequest::default())
        .await
        .map_err(status_err("Version"))?
        .into_inner();
    println!(
        "CRI-VERSION {} {} {}",
        version.runtime_name, version.runtime_version, version.runtime_api_version
    );
    let name = format!("pod-{}", args.handler);
    let config = pod_config(&name, &args.log_dir);
    let log_dir = PathBuf::from(&config.log_directory);
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let pod = Pod::run(c, config, &args.handler).await?;
    println!("CRI-POD {}", pod.id);
    let result = scenario_in(c, args, &pod, t0, &log_dir).await;
    if result.is_err() {
        // Leave nothing behind for the next test.
        let _ = pod.remove(c).await;
    }
    result
}

async fn scenario_in(
    c: &mut Client,
    args: &Args,
    pod: &Pod,
    t0: Instant,
    log_dir: &Path,
) -> Result<()> {
    let server = pod
        .create(c, container_config("server", &args.image, SERVER))
        .await?;
    let (state, _) = container_state(c, &server).await?;
    println!("CRI-POD-START-MS {}", t0.elapsed().as_millis());
    println!("CRI-SERVER-STATE {}", state.as_str_name());

    let exec = c
        .exec_sync(ExecSyncRequest {
            container_id: server.clone(),
            cmd: [
                "sh",
                "-c",
                "echo exec-out; uname -r; cat /etc/hostname; echo exec-err >&2; exit 3",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            timeout: 30,
        })
        .await
        .map_err(status_err("ExecSync"))?
        .into_inner();
    let stdout = String::from_utf8_lossy(&exec.stdout);
    let mut out = stdout.lines();
    println!("CRI-EXEC-CODE {}", exec.exit_code);
    println!("CRI-EXEC-STDOUT {}", out.next().unwrap_or(""));
    println!("CRI-EXEC-KERNEL {}", out.next().unwrap_or(""));
    // The pod's hostname file, a bind mount of the host's copy.
    println!("CRI-EXEC-HOSTNAME {}", out.next().unwrap_or(""));
    println!(
        "CRI-EXEC-STDERR {}",
        String::from_utf8_lossy(&exec.stderr).trim()
    );

    let client = pod
        .create(c, container_config("client", &args.image, CLIENT))
        .await?;
    let code = wait_exited(c, &client, Duration::from_secs(30))
        .await
        .map_err(|e| format!("client container: {e}"))?;
    println!("CRI-CLIENT-EXIT {code}");
    for (stream, text) in log_lines(&log_dir.join("client.log"), 1).await {
        println!("CRI-CLIENT-LOG {stream} {text}");
    }
    for (stream, text) in log_lines(&log_dir.join("server.log"), 2).await {
        println!("CRI-SERVER-LOG {stream} {text}");
    }

    // A container in the pod's PID namespace (shareProcessNamespace) sees
    // the sandbox's process as PID 1, and not the server, which has a PID
    // namespace of its own.
    let shared = NamespaceOption {
        pid: NamespaceMode::Pod as i32,
        ..namespaces()
    };
    let peek = pod
        .create(c, container_config_with("peek", &args.image, PEEK, shared))
        .await?;
    let code = wait_exited(c, &peek, Duration::from_secs(30))
        .await
        .map_err(|e| format!("peek container: {e}"))?;
    println!("CRI-PEEK-EXIT {code}");
    for (stream, text) in log_lines(&log_dir.join("peek.log"), 3).await {
        println!("CRI-PEEK-LOG {stream} {text}");
    }

    let ip = pod.ip(c).await?;
    println!("CRI-POD-IP {ip}");
    if !ip.is_empty() {
        let ip2 = ip.clone();
        let got = tokio::task::spawn_blocking(move || http_get(&ip2, 8080))
            .await
            .map_err(|e| e.to_string())??;
        println!("CRI-NODE-GET {got}");
    }

    c.stop_container(StopContainerRequest {
        container_id: server.clone(),
        timeout: 5,
    })
    .await
    .map_err(status_err("StopContainer"))?;
    let (state, code) = container_state(c, &server).await?;
    println!("CRI-SERVER-STOPPED {} {code}", state.as_str_name());
    for id in [&server, &client, &peek] {
        c.remove_container(RemoveContainerRequest {
            container_id: id.to_string(),
        })
        .await
        .map_err(status_err("RemoveContainer"))?;
    }
    pod.remove(c).await?;
    let left = c
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .map_err(status_err("ListPodSandbox"))?
        .into_inner()
        .items
        .len();
    println!("CRI-PODS-LEFT {left}");
    Ok(())
}

async fn bench(c: &mut Client, args: &Args) -> Result<()> {
    let mut samples = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let name = format!("bench-{}-{i}", args.handler);
        let mut config = pod_config(&name, &args.log_dir);
        let mut container = container_config("app", &args.image, &["sleep", "600"]);
        // A sized pod, as the kubelet sends it: its resources the sum of
        // its (one) container's limits.
        if args.pod_mib > 0 || args.pod_cpus > 0 {
            let limits = k8s_cri::v1::LinuxContainerResources {
                memory_limit_in_bytes: args.pod_mib << 20,
                cpu_period: 100_000,
                cpu_quota: args.pod_cpus * 100_000,
                cpu_shares: (args.pod_cpus * 1024).max(2),
                ..Default::default()
            };
            if let Some(l) = config.linux.as_mut() {
                l.resources = Some(limits.clone());
            }
            if let Some(l) = container.linux.as_mut() {
                l.resources = Some(limits);
            }
        }
        std::fs::create_dir_all(&config.log_directory).map_err(|e| e.to_string())?;
        if let Some(dir) = &args.fresh_cache {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let t0 = Instant::now();
        let pod = Pod::run(c, config, &args.handler).await?;
        let started = pod.create(c, container).await;
        let state = match &started {
            Ok(id) => container_state(c, id).await.map(|(s, _)| s),
            Err(e) => Err(e.clone()),
        };
        let elapsed = t0.elapsed();
        pod.remove(c).await?;
        match state? {
            ContainerState::ContainerRunning => samples.push(elapsed.as_secs_f64() * 1000.0),
            other => return Err(format!("run {i}: the container is {}", other.as_str_name())),
        }
    }
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let median = match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    };
    let round = |v: f64| (v * 10.0).round() / 10.0;
    let json = serde_json::json!({
        "benchmark": "cri_pod_start",
        "handler": args.handler,
        "pod_mib": args.pod_mib,
        "pod_cpus": args.pod_cpus,
        "image": args.image,
        "fresh_cache": args.fresh_cache.is_some(),
        "runs": samples.len(),
        "median_ms": round(median),
        "min_ms": round(sorted.first().copied().unwrap_or(0.0)),
        "max_ms": round(sorted.last().copied().unwrap_or(0.0)),
        "samples_ms": samples.iter().map(|v| round(*v)).collect::<Vec<_>>(),
    });
    println!("{json}");
    Ok(())
}

fn main() {
    let args = parse_args();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("husk-cri: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async {
        let mut c = connect(&args.socket).await?;
        match args.command.as_str() {
            "scenario" => scenario(&mut c, &args).await,
            "behaviours" => behaviours::behaviours(&mut c, &args).await,
            "resources" => resources::resources(&mut c, &args).await,
            "port-forward" => portforward::port_forward(&mut c, &args).await,
            "volumes" => volumes::volumes(&mut c, &args).await,
            "kill-virtiofsd" => volumes::kill_virtiofsd(&mut c, &args).await,
            "many" => volumes::many(&mut c, &args).await,
            "escape" => volumes::escape(&mut c, &args).await,
            "propagation" => propagation::propagation(&mut c, &args).await,
            "clones" => clones::clones(&mut c, &args).await,
            _ => bench(&mut c, &args).await,
        }
    });
    if let Err(e) = result {
        println!("CRI-FAILED {e}");
        std::process::exit(1);
    }
}
