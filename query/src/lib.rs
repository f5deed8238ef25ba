//! The query service: analytics, trace lookups, ad-hoc SQL and export. Not yet built: see the open issues.
