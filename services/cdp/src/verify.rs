//! `cdp erasure verify` across services: the erasure crate searches Postgres and the topics;
//! the archive is the archiver's to read, so its records are fed to the erasure crate's
//! search here, where both are known.

use cdp_runtime::topics::Topics;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Erasure(#[from] cdp_erasure::ErasureError),
    #[error("reading the archive")]
    Archive(#[from] cdp_archiver::StoreError),
    #[error("key store")]
    Keys(#[from] cdp_keystore::KeyStoreError),
}

/// What `cdp erasure verify` reports: Postgres and the topics searched by the erasure
/// crate, then every archived topic's files read here and fed to its search.
pub async fn erasure(
    requests: &cdp_erasure::Requests,
    config: &cdp_erasure::ErasureConfig,
    id: uuid::Uuid,
    extra_topics: &[String],
    archive: Option<&cdp_archiver::StoreArgs>,
) -> Result<cdp_erasure::verify::Report, VerifyError> {
    let mut report = requests.verify(id, extra_topics).await?;
    let Some(store) = archive else {
        return Ok(report);
    };
    let archive = cdp_archiver::Archive::open(store)?;
    let names = Topics::new(&config.kafka.topic_prefix);
    let topics = cdp_runtime::topics::catalogue(&names)
        .into_iter()
        .map(|(name, _)| name)
        .chain(extra_topics.iter().cloned());
    for topic in topics {
        let files = archive.list(&topic, None).await?;
        if files.is_empty() {
            continue;
        }
        let mut search = requests
            .search_store(id, format!("archive {archive} {topic}"))
            .await?;
        for file in &files {
            let (_, records) = archive.read(file).await?;
            for r in &records {
                search.record(
                    r.key.as_deref(),
                    r.value.as_deref(),
                    r.headers.iter().filter_map(|(_, v)| v.as_deref()),
                );
            }
        }
        report.stores.push(search.finish(requests.keys()).await?);
    }
    Ok(report)
}
