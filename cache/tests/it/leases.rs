//! Leases: exclusive across processes through the filesystem alone, refreshed while held, broken
//! only when expired and their owner is gone.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use progdiff_cache::{LeaseOwner, hash_bytes};

use super::cache;

fn never(_: &LeaseOwner) -> Option<bool> {
    panic!("the owner check is only asked about expired leases of other hosts' owners")
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn a_lease_is_exclusive_until_released() {
    let (_d, c) = cache();
    let key = hash_bytes(b"k");
    let ttl = Duration::from_secs(60);
    let lease = c.try_lease(&key, None, ttl, &never).unwrap().expect("free");
    let owner = c.lease_owner(&key).unwrap();
    assert_eq!(owner.pid, std::process::id());
    assert!(owner.expires > now_s());
    assert!(c.try_lease(&key, None, ttl, &never).unwrap().is_none(), "held");
    drop(lease);
    assert!(c.lease_owner(&key).is_none(), "released on drop");
    assert!(c.try_lease(&key, None, ttl, &never).unwrap().is_some());
}

#[test]
fn the_heartbeat_pushes_the_expiry_forward() {
    let (_d, c) = cache();
    let key = hash_bytes(b"beat");
    let _lease = c.try_lease(&key, None, Duration::from_secs(3), &never).unwrap().unwrap();
    let first = c.lease_owner(&key).unwrap().expires;
    std::thread::sleep(Duration::from_millis(2500));
    assert!(c.lease_owner(&key).unwrap().expires > first, "refreshed every ttl/3");
}

fn plant(c: &progdiff_cache::Cache, key: &progdiff_cache::Digest, owner: &LeaseOwner) {
    let path = c.lease_path(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec(owner).unwrap()).unwrap();
}

#[test]
fn an_expired_lease_of_a_dead_process_is_broken_but_a_live_owner_keeps_it() {
    let (_d, c) = cache();
    let key = hash_bytes(b"stale");
    let ttl = Duration::from_secs(60);
    let host = progdiff_cache::host_name();
    // A pid that does not exist on this host, expired: stale.
    let dead = LeaseOwner { host: host.clone(), pid: u32::MAX - 7, slurm_job: None, expires: 1 };
    plant(&c, &key, &dead);
    assert!(c.try_lease(&key, None, ttl, &never).unwrap().is_some(), "broken and taken");

    // A live process (pid 1 always exists), expired: kept.
    let key = hash_bytes(b"live");
    plant(&c, &key, &LeaseOwner { host: host.clone(), pid: 1, slurm_job: None, expires: 1 });
    assert!(c.try_lease(&key, None, ttl, &never).unwrap().is_none());

    // A dead process whose lease has not expired yet: kept.
    let key = hash_bytes(b"fresh");
    plant(&c, &key, &LeaseOwner { expires: now_s() + 600, ..dead });
    assert!(c.try_lease(&key, None, ttl, &never).unwrap().is_none());
}

#[test]
fn a_slurm_owner_is_judged_by_the_queue() {
    let (_d, c) = cache();
    let ttl = Duration::from_secs(60);
    let owner = |job: &str| LeaseOwner {
        host: "node7".into(),
        pid: 42,
        slurm_job: Some(job.into()),
        expires: 1,
    };
    let key = hash_bytes(b"running");
    plant(&c, &key, &owner("12"));
    let in_queue = |o: &LeaseOwner| Some(o.slurm_job.as_deref() == Some("12"));
    assert!(c.try_lease(&key, None, ttl, &in_queue).unwrap().is_none(), "job 12 still runs");
    let key = hash_bytes(b"gone");
    plant(&c, &key, &owner("13"));
    assert!(c.try_lease(&key, None, ttl, &in_queue).unwrap().is_some(), "job 13 left the queue");
}

#[test]
fn a_requeued_job_breaks_the_lease_its_killed_earlier_run_left() {
    let (_d, c) = cache();
    let ttl = Duration::from_secs(60);
    // Job 12's first run was killed holding the lease (not expired, and job 12 is in the queue:
    // it is the requeued run itself).
    let key = hash_bytes(b"requeued");
    plant(
        &c,
        &key,
        &LeaseOwner {
            host: "node7".into(),
            pid: 42,
            slurm_job: Some("12".into()),
            expires: u64::MAX,
        },
    );
    let in_queue = |o: &LeaseOwner| Some(o.slurm_job.as_deref() == Some("12"));
    assert!(c.try_lease(&key, Some("13".into()), ttl, &in_queue).unwrap().is_none(), "another job");
    assert!(c.try_lease(&key, None, ttl, &in_queue).unwrap().is_none(), "not a Slurm job");
    let lease = c.try_lease(&key, Some("12".into()), ttl, &in_queue).unwrap();
    assert!(lease.is_some(), "job 12's new run takes over from its dead earlier run");
}

#[test]
fn contenders_for_a_stale_lease_never_hold_it_together() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (_d, c) = cache();
    let key = hash_bytes(b"race");
    let host = progdiff_cache::host_name();
    for _ in 0..20 {
        plant(
            &c,
            &key,
            &LeaseOwner { host: host.clone(), pid: u32::MAX - 9, slurm_job: None, expires: 1 },
        );
        let holders = AtomicUsize::new(0);
        let taken = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    if let Some(lease) =
                        c.try_lease(&key, None, Duration::from_secs(60), &never).unwrap()
                    {
                        taken.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        std::thread::sleep(Duration::from_millis(30));
                        holders.fetch_sub(1, Ordering::SeqCst);
                        drop(lease);
                    }
                });
            }
        });
        assert!(taken.load(Ordering::SeqCst) >= 1, "the stale lease was broken");
        assert!(c.lease_owner(&key).is_none(), "released");
    }
}
