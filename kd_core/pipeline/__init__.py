"""Orchestration: the stage DAG (`dag`), dvc.yaml from the declarations (`dvcfile`), the flow's DVC bookkeeping
(`dvc`), the run lock (`lock`), stages run as processes or under a launcher (`launcher`), what a node and a run
do (`execute`), the console lines (`console`) and Prefect's temporary server (`prefect_server`)."""
