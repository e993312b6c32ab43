//! Who may connect and what they may do, against a real domkitd process (no guest boot):
//! the read-only socket refuses mutations, TCP needs a client certificate of the configured
//! CA, plaintext TCP is never offered, one daemon per state root, and errors keep their
//! kind and the library's message.

mod common;

use common::{Daemon, Dirs};
use domkitd::client::{self, ClientError, ClientTls, Target};
use domkitd::pb;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};
use std::process::Command;

#[tokio::test]
async fn errors_keep_their_kind_and_the_library_message() {
    let daemon = Daemon::start(Dirs::new(), &[]);
    let mut c = daemon.client().await;
    let status = c.info(common::by_name("nope")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let want = domkit_core::Error::domain_not_found("nope").to_string();
    assert_eq!(status.message(), want);
    match ClientError::from(status) {
        ClientError::Remote(r) => {
            assert_eq!(r.kind(), "not_found");
            assert_eq!(r.detail.what, "domain \"nope\"");
            assert_eq!(r.detail.message, want);
        }
        other => panic!("not a typed error: {other:?}"),
    }
    // A config the library refuses: invalid_config, with the check and the field.
    let bad = common::guest_toml("bad1").replace("memory_mib = 128", "memory_mib = 1");
    let status = c
        .define(pb::DefineRequest {
            config: bad,
            format: pb::ConfigFormat::Toml as i32,
        })
        .await
        .unwrap_err();
    let detail = domkitd::convert::detail_of(&status).expect("detail");
    assert_eq!(domkitd::convert::kind_name(detail.kind), "invalid_config");
    assert_eq!(detail.field, "memory_mib");
    assert_eq!(
        detail.message,
        domkit_core::Error::InvalidConfig(domkit_core::ConfigError::MemoryTooSmall(1)).to_string()
    );
    // Pausing a shut-off domain: invalid_state with the state and the operation.
    c.define(pb::DefineRequest {
        config: common::guest_toml("off1"),
        format: pb::ConfigFormat::Toml as i32,
    })
    .await
    .expect("define");
    let status = c.pause(common::by_name("off1")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let detail = domkitd::convert::detail_of(&status).expect("detail");
    assert_eq!(domkitd::convert::kind_name(detail.kind), "invalid_state");
    assert_eq!(detail.operation, pb::Operation::Pause as i32);
    assert_eq!(
        status.message(),
        "cannot pause a domain that is shutoff (unknown)"
    );
    c.undefine(common::by_name("off1")).await.expect("undefine");
}

#[tokio::test]
async fn the_read_only_socket_serves_queries_and_refuses_mutations() {
    let dirs = Dirs::new();
    let ro = dirs.root.path().join("ro").join("domkitd-ro.sock");
    let daemon = Daemon::start(dirs, &["--listen-ro", &format!("unix:{}", ro.display())]);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ro).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o666, "the read-only socket is for everyone");
    let full_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&daemon.socket).unwrap().permissions(),
    );
    assert_eq!(
        full_mode & 0o777,
        0o600,
        "the full-access socket is the owner's only"
    );

    let mut c = client::connect(&Target::Unix(ro.clone()))
        .await
        .expect("connect ro");
    let version = c.version(pb::VersionRequest {}).await.unwrap().into_inner();
    assert!(version.read_only);
    assert_eq!(version.protocol, "domkit.v1");
    c.list(pb::ListRequest { all: true })
        .await
        .expect("list is read-only");
    let status = c
        .define(pb::DefineRequest {
            config: common::guest_toml("ro1"),
            format: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let detail = domkitd::convert::detail_of(&status).expect("detail");
    assert_eq!(
        domkitd::convert::kind_name(detail.kind),
        "permission_denied"
    );
    let status = c.destroy(common::by_name("any")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // Nothing was defined.
    let mut full = daemon.client().await;
    let list = full
        .list(pb::ListRequest { all: true })
        .await
        .unwrap()
        .into_inner();
    assert!(list.domains.is_empty());
    assert!(daemon.log_text().contains("read-only connection refused"));
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A CA `ca` (ca.pem) and certificates it signs: server (localhost, 127.0.0.1) and
    /// client.
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki { dir };
        pki.make_ca("ca", &["server", "client"]);
        pki.make_ca("other", &["client"]);
        pki
    }

    fn make_ca(&self, ca: &str, leaves: &[&str]) {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{ca} test CA"));
        let cert = params.self_signed(&ca_key).unwrap();
        std::fs::write(self.path(&format!("{ca}.pem")), cert.pem()).unwrap();
        let issuer = Issuer::new(params, ca_key);
        for leaf in leaves {
            let key = KeyPair::generate().unwrap();
            let params =
                CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                    .unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(self.path(&format!("{ca}-{leaf}.pem")), cert.pem()).unwrap();
            std::fs::write(self.path(&format!("{ca}-{leaf}.key")), key.serialize_pem()).unwrap();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn tcp_version(
    addr: &str,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
) -> Result<pb::VersionReply, ClientError> {
    let tls = ClientTls {
        ca: Some(ca.to_path_buf()),
        cert: cert.map(|c| c.0.to_path_buf()),
        key: cert.map(|c| c.1.to_path_buf()),
    };
    let mut c = client::connect(&Target::Tcp {
        addr: addr.to_string(),
        tls,
    })
    .await?;
    Ok(c.version(pb::VersionRequest {}).await?.into_inner())
}

#[tokio::test]
async fn tcp_needs_a_client_certificate_of_the_configured_ca() {
    let pki = Pki::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let p = |n: &str| pki.path(n).display().to_string();
    let _daemon = Daemon::start(
        Dirs::new(),
        &[
            "--listen",
            &format!("tcp:{addr}"),
            "--tls-cert",
            &p("ca-server.pem"),
            "--tls-key",
            &p("ca-server.key"),
            "--tls-client-ca",
            &p("ca.pem"),
        ],
    );
    let ca = pki.path("ca.pem");
    let good = tcp_version(
        &addr,
        &ca,
        Some((&pki.path("ca-client.pem"), &pki.path("ca-client.key"))),
    )
    .await
    .expect("a client with a certificate of the CA is served");
    assert!(!good.read_only);
    let none = tcp_version(&addr, &ca, None).await;
    assert!(
        none.is_err(),
        "a client without a certificate was served: {none:?}"
    );
    let other = tcp_version(
        &addr,
        &ca,
        Some((&pki.path("other-client.pem"), &pki.path("other-client.key"))),
    )
    .await;
    assert!(
        other.is_err(),
        "a client with a certificate of another CA was served: {other:?}"
    );
}

#[test]
fn plaintext_tcp_is_never_offered_and_a_second_daemon_on_a_root_is_refused() {
    let dirs = Dirs::new();
    let out = Command::new(common::domkitd_bin())
        .args(["--foreground", "--listen", "tcp:127.0.0.1:1"])
        .arg("--state-dir")
        .arg(dirs.state())
        .arg("--runtime-dir")
        .arg(dirs.runtime())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plaintext TCP is never offered"), "{err}");

    let daemon = Daemon::start(dirs, &[]);
    let other_socket = daemon.dirs.root.path().join("second.sock");
    let out = Command::new(common::domkitd_bin())
        .arg("--foreground")
        .arg("--state-dir")
        .arg(daemon.dirs.state())
        .arg("--runtime-dir")
        .arg(daemon.dirs.runtime())
        .arg("--listen")
        .arg(format!("unix:{}", other_socket.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another domkit manager")
            && err.contains(&format!("pid {}", daemon.child.id())),
        "{err}"
    );
    assert!(!other_socket.exists(), "the refused daemon touched nothing");
}

#[test]
fn a_socket_group_makes_the_full_socket_0660_with_that_group() {
    use std::os::unix::fs::MetadataExt;
    let daemon = Daemon::start(Dirs::new(), &["--socket-group", "root"]);
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0);
    let dir = std::fs::metadata(daemon.socket.parent().unwrap()).unwrap();
    assert_eq!(
        dir.mode() & 0o070,
        0o010,
        "the group may enter, not list or write"
    );
    let out = Command::new(common::domkitd_bin())
        .args(["--foreground", "--socket-group", "no-such-group-dk"])
        .arg("--state-dir")
        .arg(daemon.dirs.root.path().join("s2"))
        .arg("--runtime-dir")
        .arg(daemon.dirs.root.path().join("r2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such group"));
}
