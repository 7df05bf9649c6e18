"""What several test modules share: loopback ports, a Spark standalone cluster, stand-in weights files,
Airflow processes, synthetic run folders. Test modules import from here, never from each other."""
