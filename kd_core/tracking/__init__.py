"""MLflow, and only here: the tracking store (`store`), pipeline and stage runs (`runs`), registered versions
(`registry`), where a version came from (`lineage`), the champion rule (`champion`) and the model card
(`model_card`). Nothing here imports the stages, the pipeline or the flow."""
