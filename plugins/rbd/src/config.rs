//! The plugin's parameters, parsed and checked without touching a cluster
//! (so they are the same, and unit-tested, whether or not librbd is there).

use std::path::PathBuf;

use nbdhost_plugin_api::{errno, Error, Result};

/// `key=value` lines for `--help`.
pub const HELP: &str = "\
image=[POOL/[NAMESPACE/]]IMAGE[@SNAP]  (required) The image; POOL defaults to rbd.
image=POOL/[NAMESPACE/]  Every image of the pool, chosen by export name.
snap=SNAP         Serve this snapshot, read-only.
conf=FILE         ceph.conf to read (default: librados' search, $CEPH_CONF first).
id=NAME           Client name without \"client.\" (default: admin).
keyring=FILE      Keyring holding the client's key (default: from the conf).
cluster=NAME      Cluster name (default: ceph).
timeout=SECONDS   Give up on the cluster after this long (default 30; 0 waits forever).";

/// The default for `timeout=`: how long a monitor or OSD may take to answer
/// before the request fails. rbd-nbd's default I/O timeout is the same.
pub const DEFAULT_TIMEOUT: u32 = 30;

/// Which image to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub pool: String,
    /// The RADOS namespace; empty for the default one.
    pub namespace: String,
    /// Empty for "every image of the pool" (`image=POOL/`), when the
    /// client's export name chooses one.
    pub image: String,
    pub snap: Option<String>,
}

impl ImageSpec {
    /// `[POOL/[NAMESPACE/]]IMAGE[@SNAP]`, as the `rbd` tool writes it, or
    /// `POOL/[NAMESPACE/]` for the whole pool.
    pub fn parse(s: &str) -> Result<ImageSpec> {
        let bad = |why: &str| {
            Error::new(
                errno::EINVAL,
                format!("image={s}: {why} (expected POOL/[NAMESPACE/]IMAGE[@SNAP])"),
            )
        };
        let (path, snap) = match s.split_once('@') {
            Some((_, "")) => return Err(bad("empty snapshot name")),
            Some((p, snap)) => (p, Some(snap.to_owned())),
            None => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (pool, namespace, image) = match parts.as_slice() {
            [image] => ("rbd", "", *image),
            [pool, image] => (*pool, "", *image),
            [pool, ns, image] => (*pool, *ns, *image),
            _ => return Err(bad("too many '/'")),
        };
        if pool.is_empty() || (image.is_empty() && parts.len() == 1) {
            return Err(bad("empty pool or image name"));
        }
        if parts.len() == 3 && namespace.is_empty() {
            return Err(bad("empty namespace"));
        }
        if image.is_empty() && snap.is_some() {
            return Err(bad("a snapshot needs an image"));
        }
        Ok(ImageSpec {
            pool: pool.to_owned(),
            namespace: namespace.to_owned(),
            image: image.to_owned(),
            snap,
        })
    }

    /// Whether this names a whole pool rather than one image.
    pub fn is_pool(&self) -> bool {
        self.image.is_empty()
    }

    /// The same pool and namespace with image `image` (at its head).
    pub fn with_image(&self, image: &str) -> ImageSpec {
        ImageSpec {
            image: image.to_owned(),
            snap: None,
            ..self.clone()
        }
    }

    /// `pool/[namespace/]image[@snap]`, for log lines.
    pub fn display(&self) -> String {
        let mut s = self.pool.clone();
        if !self.namespace.is_empty() {
            s.push('/');
            s.push_str(&self.namespace);
        }
        s.push('/');
        s.push_str(&self.image);
        if let Some(snap) = &self.snap {
            s.push('@');
            s.push_str(snap);
        }
        s
    }
}

/// Everything the command line set.
#[derive(Debug, Default, Clone)]
pub struct Config {
    pub image: Option<ImageSpec>,
    snap: Option<String>,
    pub conf: Option<PathBuf>,
    /// The client's id, without `client.`.
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
    pub cluster: Option<String>,
    /// Seconds; `None` leaves librados' own settings unless they wait
    /// forever (see `Cluster::connect`).
    pub timeout: Option<u32>,
}

impl Config {
    /// One `key=value` parameter.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let nonempty = |v: &str| {
            if v.is_empty() {
                Err(Error::new(
                    errno::EINVAL,
                    format!("{key}= must not be empty"),
                ))
            } else {
                Ok(v.to_owned())
            }
        };
        match key {
            "image" => self.image = Some(ImageSpec::parse(value)?),
            "snap" => self.snap = Some(nonempty(value)?),
            "conf" => self.conf = Some(nonempty(value)?.into()),
            "id" => {
                let v = nonempty(value)?;
                if let Some(bare) = v.strip_prefix("client.") {
                    return Err(Error::new(
                        errno::EINVAL,
                        format!("id={v}: give the id without \"client.\" (id={bare})"),
                    ));
                }
                self.id = Some(v);
            }
            "keyring" => self.keyring = Some(nonempty(value)?.into()),
            "cluster" => self.cluster = Some(nonempty(value)?),
            "timeout" => {
                self.timeout = Some(value.parse().map_err(|_| {
                    Error::new(
                        errno::EINVAL,
                        format!("timeout={value}: expected a whole number of seconds"),
                    )
                })?)
            }
            _ => {
                return Err(Error::new(
                    errno::EINVAL,
                    format!("unknown parameter '{key}'"),
                ))
            }
        }
        Ok(())
    }

    /// Check that the parameters make one image to serve: `image=` given,
    /// `snap=` not contradicting an `@SNAP`, and the named files there.
    pub fn complete(&mut self) -> Result<()> {
        let image = self.image.as_mut().ok_or_else(|| {
            Error::new(
                errno::EINVAL,
                "image= is required (image=POOL/[NAMESPACE/]IMAGE)",
            )
        })?;
        match (&image.snap, self.snap.take()) {
            (Some(a), Some(b)) if *a != b => {
                return Err(Error::new(
                    errno::EINVAL,
                    format!("image=…@{a} and snap={b} name different snapshots"),
                ))
            }
            (None, Some(_)) if image.is_pool() => {
                return Err(Error::new(
                    errno::EINVAL,
                    "snap= needs one image, not a whole pool",
                ))
            }
            (None, Some(b)) => image.snap = Some(b),
            _ => {}
        }
        for (key, path) in [("conf", &self.conf), ("keyring", &self.keyring)] {
            if let Some(p) = path {
                std::fs::metadata(p).map_err(|e| {
                    Error::new(
                        e.raw_os_error().unwrap_or(errno::EINVAL),
                        format!("{key}={}: {e}", p.display()),
                    )
                })?;
            }
        }
        Ok(())
    }

    /// The client's full name for librados.
    pub fn client_name(&self) -> String {
        format!("client.{}", self.id.as_deref().unwrap_or("admin"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> ImageSpec {
        ImageSpec::parse(s).unwrap()
    }

    #[test]
    fn an_image_spec_has_a_pool_an_optional_namespace_and_snapshot() {
        assert_eq!(spec("vms/disk1").pool, "vms");
        assert_eq!(spec("vms/disk1").image, "disk1");
        assert_eq!(spec("vms/disk1").namespace, "");
        assert_eq!(spec("vms/tenant/disk1").namespace, "tenant");
        assert_eq!(spec("disk1").pool, "rbd");
        assert_eq!(spec("vms/disk1@monday").snap.as_deref(), Some("monday"));
        assert_eq!(spec("vms/t/disk1@s").display(), "vms/t/disk1@s");
    }

    #[test]
    fn a_pool_with_a_trailing_slash_serves_each_of_its_images() {
        assert!(spec("vms/").is_pool());
        assert!(spec("vms/tenant/").is_pool());
        assert_eq!(spec("vms/tenant/").namespace, "tenant");
        assert!(!spec("vms/disk1").is_pool());
        assert_eq!(spec("vms/").with_image("d").display(), "vms/d");
        let mut c = Config::default();
        c.set("image", "vms/").unwrap();
        c.set("snap", "s").unwrap();
        assert!(c.complete().is_err(), "snap= and a whole pool");
    }

    #[test]
    fn a_malformed_image_spec_is_refused() {
        for bad in ["", "/disk", "a/b/c/d", "vms//disk", "vms/disk@", "vms/@s"] {
            assert!(ImageSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snap_and_an_at_sign_must_agree() {
        let mut c = Config::default();
        c.set("image", "vms/d@a").unwrap();
        c.set("snap", "b").unwrap();
        assert!(c.complete().is_err());
        let mut c = Config::default();
        c.set("image", "vms/d").unwrap();
        c.set("snap", "b").unwrap();
        c.complete().unwrap();
        assert_eq!(c.image.unwrap().snap.as_deref(), Some("b"));
    }

    #[test]
    fn the_client_id_is_given_without_its_prefix() {
        let mut c = Config::default();
        assert_eq!(c.client_name(), "client.admin");
        assert!(c.set("id", "client.nbd").is_err());
        c.set("id", "nbd").unwrap();
        assert_eq!(c.client_name(), "client.nbd");
        assert!(c.set("timeout", "soon").is_err());
        assert!(c.set("colour", "red").is_err());
        let mut c = Config::default();
        assert!(c.complete().is_err(), "image= is required");
    }
}
