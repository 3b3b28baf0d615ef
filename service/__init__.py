"""k5serve gateway and the job contract shared with workers."""
