//! Test support: the stack on port 0, throwaway PostgreSQL databases, waiting with deadlines
