//! Development certificates: one CA, and per service a certificate that
//! works as both server and client certificate.

use std::{
    fs::OpenOptions,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, string::Ia5String,
};
use time::{Duration, OffsetDateTime};

use crate::TlsError;

/// The SPIFFE trust domain of development certificates: a service `NAME`
/// is `spiffe://lightbox.local/NAME`.
pub const DEV_TRUST_DOMAIN: &str = "lightbox.local";

/// How long development certificates are valid. Starting a day back keeps
/// them valid on a machine (or container) whose clock runs a little behind.
const CA_DAYS: i64 = 10 * 365;
const LEAF_DAYS: i64 = 2 * 365;
const BACKDATE_DAYS: i64 = 1;

/// Writes a development CA (`ca.pem`, `ca.key`) and, for each of `names`
/// (e.g. `users`, `gateway`), `NAME.pem` and `NAME.key` into `out_dir`
/// (created if missing); returns the files written, CA first.
///
/// Each service certificate is signed by the CA, has the EKUs serverAuth
/// and clientAuth (one file pair is the service's server certificate and its
/// client certificate towards others), and has the SANs: `NAME`,
/// `localhost`, `127.0.0.1`, `::1`, each of `extra_hosts` (an IP address or
/// a DNS name, e.g. `users.lightbox.svc.cluster.local`), and the URI
/// `spiffe://lightbox.local/NAME`. Keys are ECDSA P-256, written with mode
/// 0600 on Unix.
///
/// Without `force`, refuses (before writing anything) if any of the files
/// exists; with it, replaces them all, CA included.
pub fn generate_dev_certs(
    out_dir: &Path,
    names: &[&str],
    extra_hosts: &[String],
    force: bool,
) -> Result<Vec<PathBuf>, TlsError> {
    for (i, name) in names.iter().enumerate() {
        check_name(name)?;
        if names[..i].contains(name) {
            return Err(invalid(name, "given twice"));
        }
    }
    let mut hosts = vec![SanType::DnsName(ia5("localhost")?)];
    for ip in ["127.0.0.1", "::1"] {
        hosts.push(SanType::IpAddress(
            ip.parse().map_err(|_| invalid(ip, "not an IP address"))?,
        ));
    }
    for host in extra_hosts {
        hosts.push(host_san(host)?);
    }

    let files: Vec<PathBuf> = std::iter::once("ca")
        .chain(names.iter().copied())
        .flat_map(|name| [out_dir.join(format!("{name}.pem")), out_dir.join(format!("{name}.key"))])
        .collect();
    if !force && let Some(existing) = files.iter().find(|path| path.exists()) {
        return Err(TlsError::Exists { path: existing.clone() });
    }
    std::fs::create_dir_all(out_dir).map_err(|source| TlsError::Write {
        path: out_dir.to_owned(),
        source,
    })?;

    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::days(BACKDATE_DAYS);

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.remove(DnType::CommonName);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Lightbox development CA");
    ca_params.distinguished_name.push(DnType::OrganizationName, "Lightbox");
    // Path length 0: it signs service certificates, never another CA.
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = now + Duration::days(CA_DAYS);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&files[0], ca_cert.pem().as_bytes(), false, force)?;
    write(&files[1], ca_key.serialize_pem().as_bytes(), true, force)?;
    let issuer = Issuer::new(ca_params, ca_key);

    for (i, name) in names.iter().enumerate() {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.remove(DnType::CommonName);
        params.distinguished_name.push(DnType::CommonName, *name);
        params.distinguished_name.push(DnType::OrganizationName, "Lightbox");
        params.subject_alt_names = std::iter::once(SanType::DnsName(ia5(name)?))
            .chain(hosts.iter().cloned())
            .chain(std::iter::once(SanType::URI(ia5(&format!(
                "spiffe://{DEV_TRUST_DOMAIN}/{name}"
            ))?)))
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = now + Duration::days(LEAF_DAYS);
        let cert = params.signed_by(&key, &issuer)?;
        write(&files[2 + 2 * i], cert.pem().as_bytes(), false, force)?;
        write(&files[3 + 2 * i], key.serialize_pem().as_bytes(), true, force)?;
    }
    Ok(files)
}

/// A service name becomes a file name, a DNS name and a SPIFFE path: one
/// DNS label, lowercase.
fn check_name(name: &str) -> Result<(), TlsError> {
    if name.is_empty() || name.len() > 63 {
        return Err(invalid(name, "a name is 1 to 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(invalid(
            name,
            "use lowercase letters, digits and inner '-' only (it is a file name, a DNS name and a SPIFFE path)",
        ));
    }
    if name == "ca" {
        return Err(invalid(name, "`ca` is the CA's own file name"));
    }
    Ok(())
}

/// An extra host as a SAN: an IP address, else a DNS name.
fn host_san(host: &str) -> Result<SanType, TlsError> {
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*');
    if !valid {
        return Err(invalid(host, "not an IP address or a DNS name"));
    }
    Ok(SanType::DnsName(ia5(host)?))
}

fn ia5(s: &str) -> Result<Ia5String, TlsError> {
    Ia5String::try_from(s).map_err(|err| invalid(s, &err.to_string()))
}

fn invalid(name: &str, reason: &str) -> TlsError {
    TlsError::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Writes `contents` to `path`; a private file is readable by its owner
/// only (mode 0600 on Unix, also when it replaces a wider file).
fn write(path: &Path, contents: &[u8], private: bool, force: bool) -> Result<(), TlsError> {
    let failed = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        // Also refuses a file that appeared since the check above.
        options.create_new(true);
    }
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(failed)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt as _;
        // `mode` applies only when the file is created.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(failed)?;
    }
    file.write_all(contents).map_err(failed)?;
    file.sync_all().map_err(failed)
}
