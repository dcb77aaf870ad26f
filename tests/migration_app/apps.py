from django.apps import AppConfig


class MigrationAppConfig(AppConfig):
    name = "tests.migration_app"
    label = "migration_app"
    default_auto_field = "django.db.models.BigAutoField"
