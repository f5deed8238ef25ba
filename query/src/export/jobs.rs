//! Exports as jobs (`POST /v1/exports`): started by a request, run in the background one at a
//! time (the others wait their turn), watched through `GET /v1/exports/{id}`. Jobs live in the
//! server's memory: the newest [`KEPT`] are kept, and a restart forgets them (an export that was
//! cut short is simply run again: it adds what its table does not hold yet).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, SecondsFormat, Utc};
use loom_projector::archive::ArchiveLocation;
use serde::Serialize;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{Bodies, ExportError, Exporter, Progress, ProgressView, Report, Request, Target};
use crate::archive::{Access, Scope};

/// Jobs kept (finished or not); the oldest finished ones are forgotten past it.
const KEPT: usize = 100;

/// Where a job is.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum JobState {
    /// Waiting for the export before it to finish.
    Queued,
    Running,
    Succeeded {
        result: Report,
    },
    Failed {
        error: String,
    },
}

/// One export job.
#[derive(Debug)]
pub struct Job {
    pub id: Uuid,
    pub scope: Scope,
    pub bodies: Bodies,
    pub target: String,
    pub created_at: DateTime<Utc>,
    pub progress: Arc<Progress>,
    state: Mutex<(JobState, Option<DateTime<Utc>>)>,
}

/// A job as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    #[schema(value_type = String)]
    pub id: Uuid,
    #[serde(flatten)]
    pub state: JobState,
    pub target: String,
    pub bodies: Bodies,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub progress: ProgressView,
}

impl Job {
    pub fn state(&self) -> JobState {
        self.lock().0.clone()
    }

    pub fn view(&self) -> JobView {
        let (state, finished_at) = self.lock().clone();
        JobView {
            id: self.id,
            state,
            target: self.target.clone(),
            bodies: self.bodies,
            created_at: self.created_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            finished_at: finished_at.map(|at| at.to_rfc3339_opts(SecondsFormat::Millis, true)),
            progress: self.progress.snapshot(),
        }
    }

    fn set(&self, state: JobState) {
        let finished = matches!(state, JobState::Succeeded { .. } | JobState::Failed { .. });
        *self.lock() = (state, finished.then(now));
    }

    fn finished(&self) -> bool {
        matches!(
            self.lock().0,
            JobState::Succeeded { .. } | JobState::Failed { .. }
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (JobState, Option<DateTime<Utc>>)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("{KEPT} exports are queued or running already; retry when one has finished")]
    Busy,
}

/// The export jobs of a server, whose tables go under `root`.
pub struct Jobs {
    exporter: Arc<Exporter>,
    root: ArchiveLocation,
    jobs: Mutex<VecDeque<Arc<Job>>>,
    /// One export runs at a time: they read the whole archive, and share its runtime with SQL.
    turn: Arc<Semaphore>,
}

impl Jobs {
    pub fn new(exporter: Arc<Exporter>, root: ArchiveLocation) -> Jobs {
        Jobs {
            exporter,
            root,
            jobs: Mutex::default(),
            turn: Arc::new(Semaphore::new(1)),
        }
    }

    /// Starts exporting `scope`'s events (read with `access`) to its table `name` under the root.
    pub fn start(
        &self,
        scope: Scope,
        access: Access,
        name: &str,
        bodies: Bodies,
    ) -> Result<Arc<Job>, JobsError> {
        if bodies != Bodies::Omit && access != Access::Full {
            return Err(ExportError::Forbidden(match bodies {
                Bodies::Decrypt => "decrypt",
                _ => "sealed",
            })
            .into());
        }
        let target = Target::under(&self.root, scope, name)?;
        let job = Arc::new(Job {
            id: Uuid::now_v7(),
            scope,
            bodies,
            target: target.to_string(),
            created_at: now(),
            progress: Arc::default(),
            state: Mutex::new((JobState::Queued, None)),
        });
        {
            let mut jobs = self.lock();
            if jobs.len() >= KEPT {
                match jobs.iter().position(|job| job.finished()) {
                    Some(oldest) => drop(jobs.remove(oldest)),
                    None => return Err(JobsError::Busy),
                }
            }
            jobs.push_back(Arc::clone(&job));
        }
        let (exporter, turn, running) = (
            Arc::clone(&self.exporter),
            Arc::clone(&self.turn),
            Arc::clone(&job),
        );
        tokio::spawn(async move {
            let Ok(_turn) = turn.acquire_owned().await else {
                return;
            };
            running.set(JobState::Running);
            let request = Request {
                scope,
                bodies,
                target,
            };
            let state = match exporter.run(request, Arc::clone(&running.progress)).await {
                Ok(result) => {
                    tracing::info!(job = %running.id, rows = result.rows, target = %result.target, "export done");
                    JobState::Succeeded { result }
                }
                Err(error) => {
                    tracing::warn!(job = %running.id, %error, "export failed");
                    JobState::Failed {
                        error: error.to_string(),
                    }
                }
            };
            running.set(state);
        });
        Ok(job)
    }

    /// Job `id`, if `scope` started it (the operator sees every job).
    pub fn get(&self, scope: Scope, id: Uuid) -> Option<Arc<Job>> {
        self.lock()
            .iter()
            .find(|job| job.id == id && visible(scope, job))
            .cloned()
    }

    /// The jobs `scope` may see, newest first.
    pub fn list(&self, scope: Scope) -> Vec<Arc<Job>> {
        self.lock()
            .iter()
            .rev()
            .filter(|job| visible(scope, job))
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn visible(scope: Scope, job: &Job) -> bool {
    scope == Scope::AllTenants || job.scope == scope
}

fn now() -> DateTime<Utc> {
    DateTime::from(std::time::SystemTime::now())
}
