//! Projectors fold the log into read models and the encrypted Parquet archive. Not yet built: see the open issues.
