raise RuntimeError("this app cannot boot: database password missing")
