"""k5serve GPU worker: a warm Kandinsky 5 pipeline behind an RQ queue."""
