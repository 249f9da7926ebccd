//! master: the mailsrv supervisor. See master(8).

use anyhow::Context;
use common::daemon;
use common::safeio::{try_lock_exclusive, write_atomic};
use mailsrv_mta::supervisor;

fn main() -> std::process::ExitCode {
    daemon::main("master", 1, || Ok(daemon::start("master")?), run)
}

async fn run(
    (config_path, config): (std::path::PathBuf, common::config::Config),
) -> anyhow::Result<()> {
    let config_path = std::path::absolute(&config_path).context("resolving the config path")?;
    let run_dir = &config.paths.run_dir;
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let lock_path = run_dir.join("master.lock");
    let _lock = try_lock_exclusive(&lock_path)
        .with_context(|| format!("locking {}", lock_path.display()))?
        .context("mailsrv is already running")?;
    let pid_path = config.paths.pid_file("master");
    write_atomic(&pid_path, format!("{}\n", std::process::id()).as_bytes())
        .with_context(|| format!("writing {}", pid_path.display()))?;
    let result = supervisor::run(&config_path, &config).await;
    let _ = std::fs::remove_file(&pid_path);
    result
}
