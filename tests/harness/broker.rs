//! The test broker: Tansu 0.6.0 with sqlite storage and an index on the record headers, plus
//! a real Kafka client to inspect it. Sqlite, not memory storage: measured here, Tansu 0.6.0's
//! memory storage skips records on a fetch that starts inside a stored batch, reports a wrong
//! high watermark and answers `offsets_for_times` with 0.

use super::{HeldPort, Proc, paths, wait_until};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Tansu cannot take a listening socket and advertises its own address, so it binds a port
/// held for it (`HeldPort`) for the broker's whole life, restarts included.
pub struct Broker {
    pub proc: Proc,
    pub port: u16,
    dir: tempfile::TempDir,
    /// The SCRAM user every client must log in as, once `require_scram` ran.
    scram: Option<(String, String)>,
    // Last: released only after the process has been stopped.
    _held: HeldPort,
}

/// How long a read of a topic goes on after the records it waited for, so that one more
/// (a duplicate, a stray) would show. It is the check that nothing more arrives: Tansu
/// answers a fetch when `fetch.wait.max.ms` (500 ms) expires, so this spans several fetches.
pub const QUIET: Duration = Duration::from_secs(2);

/// One Kafka record as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp (CreateTime), milliseconds since the epoch.
    pub timestamp: Option<i64>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }
}

impl Broker {
    pub async fn start() -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("eventwire-broker-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let held = HeldPort::new();
        let port = held.port;
        let proc = Self::spawn(dir.path().to_path_buf(), port, false);
        let broker = Broker {
            proc,
            port,
            dir,
            scram: None,
            _held: held,
        };
        broker.wait_ready().await;
        broker.add_index().await;
        broker
    }

    fn spawn(dir: PathBuf, port: u16, authentication: bool) -> Proc {
        let url = format!("tcp://127.0.0.1:{port}");
        Proc::spawn(
            "broker",
            Command::new(paths().tansu)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                    // Relative on purpose: tansu's absolute sqlite URLs are broken in 0.6.0.
                    "--storage-engine",
                    "sqlite://tansu.db",
                ])
                .args(authentication.then_some("--authentication"))
                .current_dir(dir),
        )
    }

    /// Restarts the broker on the same port and data (after `proc.stop()` or `kill9()`).
    pub async fn restart(&mut self) {
        self.proc = Self::spawn(
            self.dir.path().to_path_buf(),
            self.port,
            self.scram.is_some(),
        );
        self.wait_ready().await;
    }

    /// From now on every client must log in with SASL/SCRAM as `user`: Tansu creates users
    /// only while authentication is off, then restarts with `--authentication` (all or
    /// nothing). Create topics before this; the harness's own reads log in too.
    pub async fn require_scram(&mut self, user: &str, password: &str) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let out = Command::new(paths().tansu)
            .args(["user", "create", "--broker", &url, user, password])
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("tansu user create: {e}"));
        assert!(
            out.status.success(),
            "tansu user create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.proc.stop();
        self.scram = Some((user.to_string(), password.to_string()));
        self.restart().await;
    }

    async fn wait_ready(&self) {
        let addr = format!("127.0.0.1:{}", self.port);
        let what = format!("the broker to listen on {addr}");
        wait_until(&what, Duration::from_secs(30), || async {
            // A bind failure ends the process: fail at once, with its log (printed on drop).
            assert!(!self.proc.exited(), "the broker exited instead of {what}");
            tokio::net::TcpStream::connect(&addr).await.is_ok()
        })
        .await;
    }

    /// Without this index every fetch scans all record headers (seconds per fetch).
    async fn add_index(&self) {
        let db = self.dir.path().join("tansu.db");
        let script = "import sqlite3,sys\n\
            c=sqlite3.connect(sys.argv[1], timeout=10)\n\
            c.execute('create index if not exists header_topition_offset on header (topition, offset_id)')\n\
            c.commit()";
        let what = format!("the header index to be added to {}", db.display());
        wait_until(&what, Duration::from_secs(20), || async {
            Command::new("python3")
                .args(["-c", script])
                .arg(&db)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .await;
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .unwrap_or_else(|e| panic!("admin client: {e}"));
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let res = admin
            .create_topics(
                [&topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap_or_else(|e| panic!("create topic {name}: {e}"));
        for r in res {
            if let Err((t, code)) = r {
                panic!("create topic {t}: {code}");
            }
        }
    }

    /// Reads records of `topic` from the beginning until `want` arrived or `limit` passed.
    pub fn records(&self, topic: &str, want: usize, limit: Duration) -> Vec<Record> {
        self.read(topic, want, limit, Duration::ZERO)
    }

    /// Like `records`, then reads on for `QUIET`, so that the result also holds any record
    /// beyond `want` (a duplicate, one that should not exist). For `assert_eq!(len, want)`.
    pub fn records_settled(&self, topic: &str, want: usize, limit: Duration) -> Vec<Record> {
        self.read(topic, want, limit, QUIET)
    }

    /// Every record now in `topic`: read for `QUIET`, so that a late one would show.
    pub fn all_records(&self, topic: &str) -> Vec<Record> {
        self.read(topic, 0, Duration::ZERO, QUIET)
    }

    /// The offsets `group` has committed for `topic`, by partition: the next offset to
    /// deliver (a partition without a commit is left out). Read by a client that only asks
    /// (OffsetFetch) and never joins the group, so it does not disturb its members.
    pub fn committed_offsets(&self, group: &str, topic: &str) -> BTreeMap<i32, i64> {
        let consumer = self.consumer(group);
        let mut tpl = TopicPartitionList::new();
        for p in self.partitions(&consumer, topic) {
            tpl.add_partition(topic, p);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("committed offsets of group {group} on {topic}: {e}"));
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(n) => Some((e.partition(), n)),
                _ => None,
            })
            .collect()
    }

    /// A consumer in `group` that only assigns or asks, never subscribes.
    fn consumer(&self, group: &str) -> BaseConsumer {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        if let Some((user, password)) = &self.scram {
            config
                .set("security.protocol", "SASL_PLAINTEXT")
                // `tansu user create` stores SCRAM-SHA-512 credentials.
                .set("sasl.mechanism", "SCRAM-SHA-512")
                .set("sasl.username", user)
                .set("sasl.password", password);
        }
        config.create().unwrap_or_else(|e| panic!("consumer: {e}"))
    }

    fn partitions(&self, consumer: &BaseConsumer, topic: &str) -> Vec<i32> {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("metadata {topic}: {e}"));
        md.topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect()
    }

    fn read(&self, topic: &str, want: usize, limit: Duration, quiet: Duration) -> Vec<Record> {
        // Tansu wants a group id even for assign-only consumers.
        let consumer = self.consumer(&format!("eventwire-test-{}", std::process::id()));
        let mut tpl = TopicPartitionList::new();
        for p in self.partitions(&consumer, topic) {
            let _ = tpl.add_partition_offset(topic, p, Offset::Beginning);
        }
        consumer
            .assign(&tpl)
            .unwrap_or_else(|e| panic!("assign {topic}: {e}"));
        let mut out = Vec::new();
        let start = Instant::now();
        let mut quiet_until = None;
        loop {
            let now = Instant::now();
            if quiet_until.is_none() && (out.len() >= want || now.duration_since(start) >= limit) {
                quiet_until = Some(now + quiet);
            }
            if quiet_until.is_some_and(|q| now >= q) {
                break;
            }
            let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let msg = msg.unwrap_or_else(|e| panic!("consume {topic}: {e}"));
            let headers = msg
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Record {
                partition: msg.partition(),
                offset: msg.offset(),
                key: msg.key().map(<[u8]>::to_vec),
                value: msg.payload().map(<[u8]>::to_vec),
                headers,
                timestamp: msg.timestamp().to_millis(),
            });
        }
        out
    }
}
