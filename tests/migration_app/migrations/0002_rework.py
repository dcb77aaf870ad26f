"""Drops and renames what 0001 made: the schema editor must find live names.

Unnamed constraints and indexes (``unique=True``, ``db_index=True``, the
foreign key, ``unique_together``) are looked up in the live schema by the
schema editor; a script built from 0001's state alone cannot know them.
"""

from django.db import migrations, models
from django.db.models import Q


def fill_codes(apps, schema_editor):
    Rack = apps.get_model("migration_app", "Rack")
    Rack.objects.filter(code="").update(code="unnamed")


class Migration(migrations.Migration):
    dependencies = [("migration_app", "0001_initial")]

    operations = [
        migrations.AlterUniqueTogether(name="widget", unique_together=set()),
        migrations.AlterField(
            model_name="widget", name="sku", field=models.CharField(max_length=30)
        ),
        migrations.AlterField(
            model_name="widget", name="label", field=models.CharField(max_length=50)
        ),
        migrations.RemoveConstraint(model_name="widget", name="widget_size_gte_0"),
        migrations.RemoveConstraint(model_name="widget", name="widget_label_size_uniq"),
        migrations.RenameField(model_name="widget", old_name="label", new_name="title"),
        migrations.RenameIndex(
            model_name="widget",
            new_name="widget_size_renamed_idx",
            old_name="widget_size_idx",
        ),
        migrations.AddConstraint(
            model_name="widget",
            constraint=models.CheckConstraint(
                condition=Q(size__gt=0), name="widget_size_positive"
            ),
        ),
        migrations.AlterField(
            model_name="widget",
            name="shelf",
            field=models.ForeignKey(
                db_constraint=False,
                on_delete=models.deletion.CASCADE,
                to="migration_app.shelf",
            ),
        ),
        migrations.RenameModel(old_name="Shelf", new_name="Rack"),
        migrations.RenameField(model_name="widget", old_name="shelf", new_name="rack"),
        migrations.RunPython(fill_codes, migrations.RunPython.noop),
        migrations.RunSQL(
            "COMMENT ON TABLE migration_app_widget IS 'reworked by 0002'",
            "COMMENT ON TABLE migration_app_widget IS NULL",
        ),
    ]
