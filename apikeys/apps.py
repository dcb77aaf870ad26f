from django.apps import AppConfig
from django.conf import settings

from lockngen.env import ConfigError


class ApikeysConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "apikeys"
    verbose_name = "API keys"

    def ready(self) -> None:
        from apikeys.keys import is_valid_format

        raw_key = settings.LOCKNGEN_DEV_API_KEY
        if raw_key and not is_valid_format(raw_key):
            # Never echo the value: it is a credential.
            raise ConfigError(
                "LOCKNGEN_DEV_API_KEY must look like lk_<8 letters/digits>_<32+ "
                'URL-safe characters>; generate one with: python -c "from '
                'apikeys.keys import generate_key; print(generate_key())"'
            )
